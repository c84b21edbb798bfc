"""The bioimage.io package wing, below export.py (the pipeline stage) and beside nothing else: `layout` is the contract
(member names, tensor ids, ONNX opset, architecture keys, post-processing, the shipped model.py) that every other
module here and the tests import; `writer` (module, weight formats, test tensors), `recipe` (release recipes),
`context` (what card and rdf share), `card` (cover, model card), `description` (the rdf), `zoo` (save, validate,
self-test, upload) and `reader` (a zip back into a sampler, no packaged code run). Imports point down that list's
dependencies only: layout <- writer, reader, recipe <- context <- card <- description; zoo uses layout."""
