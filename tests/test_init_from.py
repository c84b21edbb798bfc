"""`train --init-from`: fine-tuning starts from the source's weights (run folder, exported zip, bundled name), records
where they came from, and refuses bad sources with one line before writing anything."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import pytest
import torch

from denoisplit_zoo.cli import main
from denoisplit_zoo.fileio import torch_load
from denoisplit_zoo.pretrained import bundled_models, describe_bundled, load_init_source

from .synthetic import write_npz

OVER = "noise_model: {n_iterations: 50, batch_size: 20000}\n"


@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    """Other images than the source's (another seed): fine-tuning data."""
    root = tmp_path_factory.mktemp("ft")
    (root / "over.yaml").write_text(OVER)
    return write_npz(root / "other.npz", n=6, size=64, seed=7), root / "over.yaml"


def _max_weight_change(a: dict, b: dict) -> float:
    """Largest change of a trained parameter (batch-norm running statistics excluded: they move with the data)."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a
               if a[k].is_floating_point() and "running" not in k)


def test_fine_tune_from_run_folder_starts_at_its_weights_and_records_provenance(tiny_run, new_data, tmp_path,
                                                                               one_thread, capsys):
    data, over = new_data
    out = tmp_path / "ft"
    rc = main(["train", "--data", str(data), "--init-from", str(tiny_run), "--gaussian", "1", "--poisson", "1",
               "--max-steps", "1", "--config", str(over), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    src = torch_load(tiny_run / "checkpoints" / "best.pt")["model"]
    tuned = torch_load(out / "checkpoints" / "last.pt")["model"]
    # one Adamax step (lr 1e-3) moves no weight by more than ~lr; a fresh random init differs by O(0.1)
    assert _max_weight_change(src, tuned) < 5e-3
    prov = json.loads((out / "provenance.json").read_text())["init_from"]
    assert prov["kind"] == "run" and prov["source"] == str(tiny_run)
    assert prov["sha256"] == hashlib.sha256((tiny_run / "checkpoints" / "best.pt").read_bytes()).hexdigest()
    cfg = (out / "config.yaml").read_text()
    assert "preset: tiny" in cfg and f"init_from: {tiny_run}" in cfg and "kl_warmup_steps: 0" in cfg
    # noise models are the new data's own fit, not copied from the source
    assert (out / "noise_models" / "ch0.npz").read_bytes() != (tiny_run / "noise_models" / "ch0.npz").read_bytes()


def test_fine_tune_from_exported_zip(tiny_run, new_data, tmp_path, one_thread):
    from .bad_inputs import make_package

    zip_path = make_package(tiny_run, tmp_path / "pkg.zip")
    src = load_init_source(str(zip_path))
    assert src.kind == "package" and src.preset is None or src.preset == "tiny"
    ref = torch_load(tiny_run / "checkpoints" / "best.pt")["model"]
    assert _max_weight_change(ref, src.state) == 0.0  # the package's network weights are the run's
    data, over = new_data
    rc = main(["train", "--data", str(data), "--init-from", str(zip_path), "--preset", "tiny", "--gaussian", "1",
               "--max-steps", "1", "--config", str(over), "--out", str(tmp_path / "ft")])
    assert rc == 0
    assert json.loads((tmp_path / "ft" / "provenance.json").read_text())["init_from"]["sha256"] == \
        hashlib.sha256(zip_path.read_bytes()).hexdigest()


def test_bundled_models_are_listed_and_loadable(capsys):
    names = bundled_models()
    assert names, "the repository bundles at least one model in weights/"
    rows = describe_bundled()
    assert [r["name"] for r in rows] == list(names)
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    for name in names:
        assert name in printed
    src = load_init_source(next(iter(names)))
    assert src.kind == "bundled" and len(src.sha256) == 64 and src.state


def _bad(tmp_path, tiny_run):
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(tiny_run, no_ckpt)
    shutil.rmtree(no_ckpt / "checkpoints")
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("rdf.yaml", "type: model\nname: someone else's model\n")
    text = tmp_path / "weights.txt"
    text.write_text("not weights\n")
    return [(str(tmp_path / "missing"), "no such run folder"), ("not_a_bundled_model", "bundled:"),
            (str(no_ckpt), "no checkpoints"), (str(foreign), "foreign.zip"), (str(text), "expected a run folder")]


def test_bad_init_sources_are_one_line_and_write_nothing(tiny_run, new_data, tmp_path, capsys):
    data, over = new_data
    for source, words in _bad(tmp_path, tiny_run):
        out = tmp_path / "out"
        rc = main(["train", "--data", str(data), "--init-from", source, "--config", str(over), "--max-steps", "1",
                   "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and words in err and len(err.splitlines()) == 1, (source, err)
        assert not out.exists()


def test_tampered_zip_and_architecture_mismatch_are_refused(tiny_run, new_data, tmp_path, capsys):
    from .bad_inputs import write_packages

    data, over = new_data
    pkg = write_packages(tmp_path, tiny_run)
    out = tmp_path / "out"
    rc = main(["train", "--data", str(data), "--init-from", str(pkg / "tampered_weights.zip"), "--config", str(over),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "sha256" in err and not out.exists()
    # the tiny source into the small preset: the first differing key is named
    rc = main(["train", "--data", str(data), "--init-from", str(tiny_run), "--preset", "small", "--config",
               str(over), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "architecture differs (model." in err and len(err.splitlines()) == 1 and not out.exists()
    rc = main(["train", "--resume", "--init-from", str(tiny_run), "--out", str(tiny_run)])
    assert rc == 2 and "--resume" in capsys.readouterr().err
    torch.manual_seed(0)


def test_quickstart_refuses_a_bad_init_source_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--init-from", "not_a_bundled_model", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not_a_bundled_model" in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_swapped_structures_start_from_the_swapped_head():
    """A source trained on (mitochondria, actin) fine-tuned on (actin, mito): `channel_order` matches by name, and
    `reorder_output_channels` permutes only the output head, so the network predicts exactly the source's two
    structures in the new order (denoiSplit head [A, B]; uSplit head [mean A, mean B, log-var A, log-var B])."""
    from denoisplit_zoo.model import LadderVAE
    from denoisplit_zoo.pretrained import channel_order, reorder_output_channels

    assert channel_order(["mitochondria", "actin"], ("actin", "mito")) == (1, 0)
    assert channel_order(["Actin", "Mito"], ("actin", "mitochondria")) == (0, 1)
    assert channel_order(["ch0", "ch2"], ("actin", "mito")) is None  # cannot tell: keep the source's order
    torch.manual_seed(0)
    for out_channels in (2, 4):
        src = LadderVAE(3, 4, 8, 0.0, out_channels, 32).eval()
        dst = LadderVAE(3, 4, 8, 0.0, out_channels, 32).eval()
        dst.load_state_dict(reorder_output_channels(src.state_dict(), (1, 0)))
        x = torch.randn(1, 1, 32, 32)
        bu = src.bottom_up(x)
        eps = [torch.zeros(1, 4, v.shape[2], v.shape[3]) for v in bu]
        with torch.no_grad():
            a, _ = src.top_down(bu, eps, False)
            b, _ = dst.top_down(dst.bottom_up(x), eps, False)
        perm = [1, 0] if out_channels == 2 else [1, 0, 3, 2]
        torch.testing.assert_close(b, a[:, perm])
        assert reorder_output_channels(src.state_dict(), (0, 1)) is not None


def test_train_maps_the_source_structures_onto_the_data_by_name(tiny_run, tmp_path, one_thread, capsys):
    """Without --init-channels, `train --init-from` matches structures by name: a source trained on
    (mitochondria, actin) fine-tuned on folders actin/ and mito/ starts from the swapped output head (the quickstart's
    W2S -> BPAE case; before, only the quickstart mapped them and `train` silently kept the source's order)."""
    from denoisplit_zoo.pretrained import reorder_output_channels

    from .synthetic import two_structures, write_tiff_folder

    src_run = tmp_path / "src"
    shutil.copytree(tiny_run, src_run)
    (src_run / "provenance.json").write_text(json.dumps(
        {"data": {"channels": {"mitochondria": "W2S channel 0", "actin": "W2S channel 2"}}}))
    data = write_tiff_folder(tmp_path / "data", two_structures(n=6, size=64, seed=3), names=("actin", "mito"))
    (tmp_path / "over.yaml").write_text(OVER)
    out = tmp_path / "ft"
    rc = main(["train", "--data", str(data), "--init-from", str(src_run), "--gaussian", "1", "--max-steps", "1",
               "--config", str(tmp_path / "over.yaml"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    prov = json.loads((out / "provenance.json").read_text())["init_from"]
    assert prov["channel_order"] == [1, 0] and prov["channel_order_from"] == "by channel name"
    assert prov["channel_names"] == ["actin", "mito"]
    src = torch_load(src_run / "checkpoints" / "best.pt")["model"]
    tuned = torch_load(out / "checkpoints" / "last.pt")["model"]
    assert _max_weight_change(reorder_output_channels(src, (1, 0)), tuned) < 5e-3
    assert _max_weight_change(src, tuned) > 5e-3  # the head really was swapped, not left as it was


def test_init_channels_needs_init_from(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "x.npz"), "--init-channels", "1", "0", "--out",
                 str(tmp_path / "r")]) == 2
    assert "--init-channels needs --init-from" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
