"""The safe loaders' refusals are one line of our own words, never PyTorch's text cut short."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tissuegraph.cli import main
from tissuegraph.errors import InputError
from tissuegraph.graph.storage import load_graph
from tissuegraph.nn.model import read_checkpoint
from tissuegraph.train.checkpoint import load_model


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _files(tmp_path):
    rng = __import__("random").Random(0)
    ok = tmp_path / "ok.pt"
    torch.save({"model_config": {}, "state_dict": {"w": torch.zeros(300)}}, ok)
    raw = ok.read_bytes()
    files = {
        "random": bytes(rng.getrandbits(8) for _ in range(4096)),
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "text": b"not a checkpoint\n" * 20,
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(data)
    out["evil"] = tmp_path / "evil.pt"
    with open(out["evil"], "wb") as fh:
        pickle.dump({"x": _Evil()}, fh, protocol=2)
    out["list"] = tmp_path / "list.pt"
    torch.save([1, 2, 3], out["list"])
    return out


REASONS = {
    "random": "is not in PyTorch's format",
    "empty": "the file is empty",
    "truncated": "is truncated or damaged",
    "text": "is not in PyTorch's format",
    "evil": "Python object posix.system, refused by the safe loader",
    "list": "it holds a list, not a dict",
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_checkpoint_refusals(tmp_path, kind):
    p = _files(tmp_path)[kind]
    for reader in (read_checkpoint, load_model):
        with pytest.raises(InputError) as e:
            reader(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: not a tissuegraph checkpoint: ")
        assert REASONS[kind] in msg
        assert "\n" not in msg and "PyTorch 2.6" not in msg and "weights_only" not in msg
        assert msg.endswith((")", "format", "empty", "damaged", "dict"))


@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "evil"])
def test_graph_file_refusals(tmp_path, kind):
    p = _files(tmp_path)[kind]
    with pytest.raises(InputError) as e:
        load_graph(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: not a tissuegraph graph file: ") and REASONS[kind] in msg
    with pytest.raises(InputError, match="not a HeteroData"):
        load_graph(_files(tmp_path)["list"])


def test_cli_random_checkpoint(tmp_path, data_dir, capsys):
    p = _files(tmp_path)["random"]
    rc = main(
        [
            "embed",
            "--checkpoint",
            str(p),
            "--input",
            str(data_dir / "visium_toy"),
            "--out",
            str(tmp_path / "o.h5ad"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not (tmp_path / "o.h5ad").exists()
    assert (
        err
        == f"tissuegraph: error: {p}: not a tissuegraph checkpoint: the file (4,096 bytes) is not in PyTorch's format"
    )
