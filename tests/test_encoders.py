"""Encoders and their weights: the features of torchvision's ResNets and timm's ConvNeXt (reference fixtures made
with those libraries, tests/fixtures/encoders/), weight files in both formats, the ImageNet download with its
hash check, and the files a user gets wrong."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

from cityseg.models import ENCODERS, create_encoder
from cityseg.models.weights import WeightsError
from conftest import REPO, TINY, run_script
from encoder_recipe import recipe_state_dict

FIXTURES = REPO / "tests" / "fixtures" / "encoders"


def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def recipe_weights(name: str) -> dict[str, torch.Tensor]:
    """The fixture's weights, made again from its recipe (classifier keys included, as the original files have)."""
    fx = fixture(name)
    return recipe_state_dict({k: tuple(s) for k, s in fx["keys"]}, fx["recipe_seed"])


def mismatch(encoder: nn.Module, name: str) -> float:
    """The largest difference between the encoder's features and the library's, relative to each map's scale
    (inf when the shapes differ)."""
    fx = fixture(name)
    with torch.no_grad():
        ours = encoder(fx["input"])
    if [tuple(f.shape) for f in ours] != [tuple(f.shape) for f in fx["features"]]:
        return float("inf")
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, fx["features"]))


def loaded(name: str) -> nn.Module:
    encoder = ENCODERS[name].build().eval()
    encoder.load_state_dict(recipe_weights(name))
    return encoder


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_key_names_and_shapes_are_the_libraries(name):
    expected = {k: tuple(s) for k, s in fixture(name)["keys"]}  # torchvision's or timm's, classifier dropped
    assert {k: tuple(v.shape) for k, v in ENCODERS[name].build().state_dict().items()} == expected


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_tiny"])
def test_features_equal_torchvision_and_timm_given_the_same_weights(name):
    # Tolerance 1e-5 of each map's largest value: the libraries' own results moved by 5e-7 with the thread count.
    assert mismatch(loaded(name), name) < 1e-5
    assert [m.shape[1] for m in fixture(name)["features"]] == list(ENCODERS[name].build().channels)


def _stride_on_the_1x1_conv(encoder):
    for layer in (encoder.layer2, encoder.layer3, encoder.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)  # ResNet v1 instead of v1.5


def _layer_scale_dropped(encoder):
    for m in encoder.modules():
        if hasattr(m, "gamma"):
            m.gamma.data.fill_(1.0)


def _running_stats_ignored(encoder):
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()  # normalised with the batch's statistics


@pytest.mark.parametrize("name, mutate", [("resnet50", _stride_on_the_1x1_conv), ("convnext_tiny", _layer_scale_dropped),
                                          ("resnet18", _running_stats_ignored)],
                         ids=["stride-on-1x1", "no-layer-scale", "batch-statistics"])
def test_a_port_that_loads_every_key_but_computes_otherwise_is_caught(name, mutate):
    encoder = loaded(name)
    mutate(encoder)
    assert mismatch(encoder, name) > 1e-2


# -- weight files ----------------------------------------------------------------------------------------------
def test_a_torchvision_pth_and_a_timm_safetensors_load_with_their_classifiers_dropped(tmp_path):
    from safetensors.torch import save_file

    pth = tmp_path / "resnet18.pth"
    torch.save(recipe_weights("resnet18") | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, pth)
    assert mismatch(create_encoder("resnet18", weights=pth).eval(), "resnet18") < 1e-5
    old = tmp_path / "resnet18-2018.pth"  # saved before PyTorch 0.4.1: no BatchNorm step counts (torchvision's V1)
    torch.save({k: v for k, v in recipe_weights("resnet18").items() if not k.endswith("num_batches_tracked")}, old)
    assert mismatch(create_encoder("resnet18", weights=old).eval(), "resnet18") < 1e-5
    st = tmp_path / "model.safetensors"
    timm_file = recipe_weights("convnext_tiny") | {"head.norm.weight": torch.ones(768), "head.norm.bias":
                                                    torch.zeros(768), "head.fc.weight": torch.zeros(1000, 768),
                                                    "head.fc.bias": torch.zeros(1000)}
    save_file({k: v.contiguous() for k, v in timm_file.items()}, str(st))  # safetensors' own writer
    assert mismatch(create_encoder("convnext_tiny", weights=st).eval(), "convnext_tiny") < 1e-5
    bf16 = tmp_path / "bf16.safetensors"  # half-precision files load as fp32
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in timm_file.items()}, str(bf16))
    assert mismatch(create_encoder("convnext_tiny", weights=bf16).eval(), "convnext_tiny") < 1e-2


def test_imagenet_weights_are_fetched_once_and_hash_checked(tmp_path, monkeypatch):
    from cityseg.models.registry import EncoderEntry, WeightsFile

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    source = tmp_path / "server" / "resnet18.pth"
    source.parent.mkdir()
    torch.save(recipe_weights("resnet18"), source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    named = source.with_name(f"resnet18-{digest[:8]}.pth")  # torchvision's naming: the hash in the file name
    source.rename(named)
    entry = ENCODERS["resnet18"]
    official = WeightsFile(url=named.as_uri(), sha256=digest[:8], top1=0.0, source="test")
    monkeypatch.setitem(ENCODERS, "resnet18", EncoderEntry(entry.build, entry.classifier, official))
    encoder = create_encoder("resnet18", weights="imagenet")  # a file:// URL stands in for the download
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / named.name
    assert cached.is_file() and mismatch(encoder.eval(), "resnet18") < 1e-5
    named.unlink()  # the second time the cache serves it
    assert mismatch(create_encoder("resnet18", weights="imagenet").eval(), "resnet18") < 1e-5
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")  # damaged in the cache
    with pytest.raises(WeightsError, match=rf"{cached}: SHA-256 \w+\.\.\. is not the official file's "
                                           rf"\({digest[:8]}\.\.\.\); it is damaged or another file. Delete it"):
        create_encoder("resnet18", weights="imagenet")
    cached.unlink()
    bad = WeightsFile(url=(tmp_path / "server" / "other-0badc0de.pth").as_uri(), sha256="0badc0de", top1=0.0,
                      source="test")
    torch.save({"x": torch.zeros(1)}, tmp_path / "server" / "other-0badc0de.pth")
    monkeypatch.setitem(ENCODERS, "resnet18", EncoderEntry(entry.build, entry.classifier, bad))
    with pytest.raises(WeightsError, match=rf"the download of {bad.url} is not the official file \(SHA-256 "
                                           rf"\w{{16}}\.\.\. instead of 0badc0de\.\.\.\); on a machine with internet"):
        create_encoder("resnet18", weights="imagenet")
    assert list(cached.parent.iterdir()) == []  # neither the wrong file nor a temp file stays in the cache


@pytest.mark.quick
def test_wrong_weight_files_are_one_line_each(tmp_path):
    other = tmp_path / "resnet50.pth"
    torch.save(recipe_weights("resnet50"), other)
    with pytest.raises(WeightsError) as e:
        create_encoder("resnet18", weights=other)
    assert str(e.value) == (f"{other}: not resnet18 weights (165 unexpected, first: layer1.0.bn3.bias; 23 of another "
                            f"shape, first: layer1.0.conv1.weight (64, 64, 1, 1) instead of (64, 64, 3, 3)); pass a "
                            f"file made for it.")
    convnext = tmp_path / "convnext.pth"
    torch.save(recipe_weights("convnext_tiny"), convnext)
    with pytest.raises(WeightsError, match=r"not resnet18 weights \(100 keys missing, first: conv1\.weight; 178 "
                                           r"unexpected, first: stages\.0\.blocks\.0\.conv_dw\.bias\)"):
        create_encoder("resnet18", weights=convnext)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(other.read_bytes()[:5000])
    with pytest.raises(WeightsError, match=rf"{truncated}: not a readable weight file"):
        create_encoder("resnet18", weights=truncated)
    from safetensors.torch import save_file

    st = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in recipe_weights("resnet18").items()}, str(st))
    st.write_bytes(st.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match=rf"{st}: not a complete safetensors file \(truncated"):
        create_encoder("resnet18", weights=st)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(WeightsError, match=rf"{text}: not a readable weight file"):
        create_encoder("resnet18", weights=text)
    with pytest.raises(WeightsError, match=r"--encoder-weights /no/such\.pth: no such file"):
        create_encoder("resnet18", weights="/no/such.pth")


def test_a_wrong_file_stops_train_py_before_anything_is_written(synthetic_root, tmp_path):
    other = tmp_path / "resnet50.pth"
    torch.save(recipe_weights("resnet50"), other)
    out = tmp_path / "run"
    proc = run_script("train.py", ["--data-root", str(synthetic_root), "--out-dir", str(out), *TINY, "--model",
                                   "unet_resnet18", "--encoder-weights", str(other)], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {other}: not resnet18 weights (")
    assert not out.exists()


# -- downloads that go wrong -----------------------------------------------------------------------------------
class FakeServer:
    """A TCP server on 127.0.0.1 that accepts every connection and answers with ``reply`` (nothing: never a byte),
    then keeps it open until ``hold_s`` has passed, as a firewall that drops packets or a dead proxy does."""

    def __init__(self, reply: bytes, hold_s: float = 8.0):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/resnet18-0123abcd.pth"
        self.reply, self.hold_s, self.held = reply, hold_s, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + self.hold_s  # the connection closes then, so a client with no timeout ends too
        while time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.recv(65536)  # the request
            conn.sendall(self.reply)
            self.held.append(conn)
        for conn in self.held:
            conn.close()
        self.sock.close()


def _point_resnet18_at(url, monkeypatch):
    from cityseg.models.registry import EncoderEntry, WeightsFile

    entry = ENCODERS["resnet18"]
    official = WeightsFile(url=url, sha256="0123abcd", top1=0.0, source="test")
    monkeypatch.setitem(ENCODERS, "resnet18", EncoderEntry(entry.build, entry.classifier, official))


@pytest.mark.parametrize("reply, what", [
    (b"", "stalled: no data for 1 s (CITYSEG_DOWNLOAD_TIMEOUT_S sets the wait)"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 3000,
     "stalled after 3000 bytes: no data for 1 s (CITYSEG_DOWNLOAD_TIMEOUT_S sets the wait)"),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "failed: the server answered HTTP 404 Not Found"),
], ids=["silent", "stalls-mid-file", "http-404"])
def test_a_download_that_stalls_or_fails_is_one_line_soon_and_leaves_nothing_in_the_cache(tmp_path, monkeypatch,
                                                                                          reply, what):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("CITYSEG_DOWNLOAD_TIMEOUT_S", "1")
    server = FakeServer(reply)
    _point_resnet18_at(server.url, monkeypatch)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    began = time.monotonic()
    with pytest.raises(WeightsError) as e:
        create_encoder("resnet18", weights="imagenet")
    assert time.monotonic() - began < 5  # the server holds the connection for 8 s
    assert str(e.value) == (f"--encoder-weights imagenet: the download of {server.url} {what}; on a machine with "
                            f"internet, download {server.url} and copy it to {cache / 'resnet18-0123abcd.pth'} (or "
                            f"run `python -m cityseg.models.weights resnet18` there and copy the file), or pass the "
                            f"file's path with --encoder-weights.")
    assert list(cache.iterdir()) == []  # no partial file


def test_a_refused_connection_and_a_torch_home_under_a_file_are_one_line_each(tmp_path, monkeypatch):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    _point_resnet18_at(f"http://127.0.0.1:{port}/resnet18-0123abcd.pth", monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError, match=rf"the download of http://127.0.0.1:{port}/\S+ failed: connection refused; "
                                           rf"on a machine with internet"):
        create_encoder("resnet18", weights="imagenet")
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("TORCH_HOME", str(afile / "torch"))
    with pytest.raises(WeightsError) as e:
        create_encoder("resnet18", weights="imagenet")
    assert str(e.value) == (f"TORCH_HOME={afile / 'torch'}: cannot create the weights cache {afile}/torch/hub/"
                            f"checkpoints ({afile} is a file, not a directory); point TORCH_HOME at a directory, or "
                            f"pass the weight file's path with --encoder-weights.")


# -- files that are not weight files -----------------------------------------------------------------------------
def test_a_safetensors_header_is_checked_against_the_file_size_before_the_data_is_read(tmp_path):
    # A 4 GiB (sparse) file whose header claims one 4 GiB tensor: it is refused for its key, and mapped, not read.
    big = tmp_path / "big.safetensors"
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(big, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2**32)
    child = ("import sys, time; from pathlib import Path; from cityseg.models.weights import load_encoder_weights\n"
             "def kib(key): return int(next(x for x in open('/proc/self/status') if x.startswith(key)).split()[1])\n"
             "rss, t = kib('VmRSS:'), time.monotonic()\n"
             "try:\n    load_encoder_weights(Path(sys.argv[1]), 'resnet18')\n"
             "except Exception as e:\n    print(e)\n"
             "print(kib('VmHWM:') - rss, time.monotonic() - t)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(big)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    message, numbers = proc.stdout.splitlines()
    grown_kib, seconds = int(numbers.split()[0]), float(numbers.split()[1])
    assert message.startswith(f"{big}: not resnet18 weights (") and "of another shape, first: conv1.weight " \
        "(1073741824,) instead of (64, 3, 7, 7)" in message, proc.stdout + proc.stderr
    assert grown_kib < 256 * 1024 and seconds < 10, (grown_kib, seconds)  # the old reader grew by 4-12 GiB
    # A header length of 2**63 (a bit flipped, or another format) is not a header, whatever follows it.
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightsError) as e:
        create_encoder("resnet18", weights=flipped)
    assert str(e.value) == (f"{flipped}: not a complete safetensors file (its first 8 bytes give a header of "
                            f"{2**63} bytes, but the file has 10 bytes and safetensors allows 100 MB).")


def test_unreadable_files_say_what_they_are_and_never_advise_weights_only_false(tmp_path):
    from cityseg.checkpoint import CheckpointError, load

    zeros, text, objects = tmp_path / "zeros.pth", tmp_path / "notes.pth", tmp_path / "namespace.pth"
    zeros.write_bytes(bytes(4096))  # a file whose data never reached the disk
    text.write_text("see https://download.pytorch.org/models/\n")
    torch.save({"args": argparse.Namespace(lr=0.1)}, objects)
    for path, what in [(zeros, "filled with zero bytes, not a torch or safetensors file"),
                       (text, "a text file, not a torch or safetensors file"),
                       (objects, "a torch file of Python objects, not of plain tensors; cityseg does not load those, "
                                 "as that can run code")]:
        with pytest.raises(WeightsError) as e:
            create_encoder("resnet18", weights=path)
        assert str(e.value) == (f"{path}: not a readable weight file ({what}); pass a torchvision .pth or a timm "
                                f".safetensors/.bin file.")
        with pytest.raises(CheckpointError) as e:  # the checkpoint reader says the same
            load(path)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
        assert str(e.value).startswith(f"{path}: not a readable cityseg checkpoint ({what.split(',')[0]}, ")
    with pytest.raises(WeightsError) as e:
        create_encoder("resnet18", weights=tmp_path)
    assert str(e.value) == (f"--encoder-weights {tmp_path}: is a directory; pass the weight file in it (a torchvision "
                            f".pth or a timm .safetensors/.bin file), imagenet, or none.")
