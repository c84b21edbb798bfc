"""The bioimage.io package wing. `layout` is its contract (member names, tensor ids, ONNX opset, architecture keys,
post-processing): the one module that the writer (export.py), the description and model card (bmz.py), the reader
(export.load_package_sampler) and the tests all import, so no two of them keep a copy."""
