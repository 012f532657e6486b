"""``curvkit.distributed.launch``: the torchrun command, a 2-process launch, argument handling."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest

from curvkit.distributed.launch import (
    init_from_env,
    launch,
    launched,
    strip_option,
    torchrun_command,
)
from curvkit.errors import ShapeError

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_command():
    cmd = torchrun_command(3, ["train", "--steps", "5"])
    assert cmd[0] == sys.executable
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "3",
        "-m",
        "curvkit",
        "train",
        "--steps",
        "5",
    ]


@pytest.mark.parametrize("nproc", [0, -1, 1.5, True], ids=["zero", "negative", "fraction", "bool"])
def test_bad_nproc(nproc):
    with pytest.raises(ShapeError, match="nproc"):
        torchrun_command(nproc, [])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--nproc", "2", "--steps", "3"], ["train", "--steps", "3"]),
        (["train", "--nproc=2", "--steps", "3"], ["train", "--steps", "3"]),
        (["train", "--steps", "3"], ["train", "--steps", "3"]),
    ],
    ids=["separate-value", "equals-value", "absent"],
)
def test_strip_option(argv, expected):
    assert strip_option(argv) == expected


def test_no_recursive_launch(monkeypatch):
    for name, value in [("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")]:
        monkeypatch.setenv(name, value)
    assert launched()
    with pytest.raises(ShapeError, match="already started by torchrun"):
        launch(2, ["train"])


def test_outside_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert init_from_env() == (0, 1)


def test_docs_example_through_launch(tmp_path):
    """The first Python block of docs/distributed.md, on 2 processes started by ``launch``."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    (tmp_path / "distributed_example.py").write_text(
        re.findall(r"```python\n(.*?)```", text, re.S)[0]
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PYTHONWARNINGS": "ignore"}
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    with open(tmp_path / "out.txt", "a") as out, open(tmp_path / "err.txt", "w") as err:
        status = launch(2, [], "distributed_example", env=env, timeout=120, stdout=out, stderr=err)
    assert status == 0, (tmp_path / "err.txt").read_text()[-3000:]
    # the processes share the file: their lines may interleave, so match rather than split
    pattern = r"process (\d)/(\d): loss ([-\d.e]+), top eigenvalues (\[[^\]]*\])"
    found = sorted(re.findall(pattern, (tmp_path / "out.txt").read_text()))
    assert [(rank, world) for rank, world, _, _ in found] == [("0", "2"), ("1", "2")], found
    assert found[0][2:] == found[1][2:]  # the same loss and eigenvalues
    assert 0 < float(found[0][2]) < 1.0  # trained below the initial ~log(3)
