"""What a clumsy user meets: zero-byte files, a full disk, unwritable outputs, odd recipes, a killed DataLoader
worker. Each is one line naming the file, flag or path; nothing is lost beyond the step in flight, and the
same command resumes once the cause is fixed. Real files, a real small tmpfs (root), a real SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cityseg import checkpoint as ckpt
from cityseg.config import ConfigError, EvalConfig, parse_config
from cityseg.data import CityscapesDataset
from cityseg.errors import DataError
from conftest import REPO, TINY, run_main, run_metrics, run_script, run_submit, start_training, wait_for_iteration

ARGS = ["--batch-size", "2", "--lr", "0.05", "--log-every", "1", "--num-pictures", "0", "--seed", "4"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root (CI runs as root)")


def _train_args(root, out, *extra):
    return ["--data-root", str(root), "--out-dir", str(out), *TINY, *ARGS, *extra]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` mounts a tmpfs of that size (e.g. "6m") at a fresh directory; all are unmounted after."""
    mounted = []

    def mount(size: str, name: str = "disk") -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


#: The full-disk cases: 10 iterations, a checkpoint every 2.
DISK_RUN = ("--max-iters", "10", "--ckpt-every", "2", "--eval-every", "0")


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory) -> list[dict]:
    """The metrics of the full-disk cases' run without a full disk: what every resumed run must end with."""
    out = tmp_path_factory.mktemp("faults_uninterrupted")
    run_script("train.py", _train_args(synthetic_root, out, *DISK_RUN))
    return run_metrics(out)


# -- zero-byte files -----------------------------------------------------------------------------------------
def test_a_zero_byte_image_mid_run_under_torchrun_with_workers_saves_and_names_it(synthetic_root, tmp_path):
    root, out = tmp_path / "cityscapes", tmp_path / "run"
    shutil.copytree(synthetic_root, root)
    image = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[3]
    good = image.read_bytes()
    args = _train_args(root, out, "--max-iters", "24", "--workers", "1", "--eval-every", "0", "--ckpt-every", "50")
    with open(tmp_path / "first.log", "w") as log:
        proc = start_training(args, 2, log=log)
        wait_for_iteration(out, 4, proc)
        image.write_bytes(b"")  # what an interrupted copy leaves
        proc.wait(timeout=120)
    errors = _error_lines((tmp_path / "first.log").read_text())
    k = ckpt.load(out / "last.pt")["iteration"]
    assert len(errors) == 1 and 4 <= k < 24, (tmp_path / "first.log").read_text()
    assert errors[0] == (f"error: {image}: empty file (0 bytes), as an interrupted copy or a full disk leaves; "
                         f"re-extract or re-download it. Training stopped and saved {out / 'last.pt'} at iteration "
                         f"{k}; fix or remove that file (with its image or label) and run the same command to "
                         f"resume.")
    image.write_bytes(good)
    again = run_script("train.py", args, nproc=2)
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout
    assert ckpt.load(out / "last.pt")["iteration"] == 24


def test_a_zero_byte_val_image_stops_the_periodic_evaluation_after_saving(synthetic_root, tmp_path):
    root, out = tmp_path / "cityscapes", tmp_path / "run"
    shutil.copytree(synthetic_root, root)
    image = sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[2]
    good = image.read_bytes()
    image.write_bytes(b"")
    args = _train_args(root, out, "--max-iters", "6", "--eval-every", "4", "--ckpt-every", "100")
    proc = run_script("train.py", args, check=False)
    assert proc.returncode == 2 and _error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: {image}: empty file (0 bytes)")
    assert f"Training stopped and saved {out / 'last.pt'} at iteration 4; fix or remove that file" in proc.stderr
    assert ckpt.load(out / "last.pt")["iteration"] == 4  # the 4 steps before the evaluation are kept
    image.write_bytes(good)
    again = run_script("train.py", args)
    assert f"Resumed from {out / 'last.pt'} at iteration 4" in again.stdout and "done: 6 iterations" in again.stdout


def test_zero_byte_files_in_evaluate_and_images_are_one_line(synthetic_root, trained, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    label = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))[1]
    label.write_bytes(b"")
    proc = run_script("evaluate.py", ["--checkpoint", str(trained), "--data-root", str(root), "--device", "cpu",
                                      "--workers", "1", "--out-dir", str(tmp_path / "eval")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {label}: empty file (0 bytes), as an interrupted copy or a full disk leaves; re-extract or "
        f"re-download it."], proc.stderr
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "empty.jpg").write_bytes(b"")
    proc = run_script("evaluate.py", ["--checkpoint", str(trained), "--images", str(photos), "--device", "cpu",
                                      "--out-dir", str(tmp_path / "mine")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {photos / 'empty.jpg'}: empty file (0 bytes), as an interrupted copy or a full disk leaves; "
        f"re-extract or re-download it."], proc.stderr


# -- a full disk ---------------------------------------------------------------------------------------------
@needs_root
def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(synthetic_root, tmpfs, uninterrupted):
    out = tmpfs("6m")  # room for one 4 MB checkpoint, not two
    args = _train_args(synthetic_root, out, *DISK_RUN)
    proc = run_script("train.py", args, check=False)
    assert proc.returncode == 2 and _error_lines(proc.stderr) == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: {out / 'ckpt_00000004.pt'}: could not write the checkpoint (No space "
                                  f"left on device"), proc.stderr
    assert "run the same command. The previous checkpoint there is intact." in proc.stderr
    assert not list(out.glob(".*.tmp")) and ckpt.load(out / "last.pt")["iteration"] == 2
    subprocess.run(["mount", "-o", "remount,size=40m", str(out)], check=True)  # space freed
    again = run_script("train.py", args)
    assert f"Resumed from {out / 'last.pt'} at iteration 2" in again.stdout
    assert run_metrics(out) == uninterrupted


@needs_root
def test_a_full_disk_while_logging_stops_and_the_log_never_blocks_the_resume(synthetic_root, tmp_path, tmpfs,
                                                                              uninterrupted):
    out = tmpfs("16m")
    args = _train_args(synthetic_root, out, *DISK_RUN)
    with open(tmp_path / "first.log", "w") as log:
        proc = start_training(args, 0, log=log)
        wait_for_iteration(out, 3, proc)
        with open(out / "filler", "wb") as f:  # another program fills the disk
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
        rc = proc.wait(timeout=120)
    text = (tmp_path / "first.log").read_text()
    assert rc == 2 and len(_error_lines(text)) == 1, text
    assert "No space left on device" in _error_lines(text)[0] and "Traceback" not in text
    k = ckpt.load(out / "last.pt")["iteration"]
    (out / "filler").unlink()
    again = run_script("train.py", args)
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout
    assert run_metrics(out) == uninterrupted


def test_a_record_cut_short_in_the_log_is_dropped_on_resume(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = _train_args(synthetic_root, out, "--eval-every", "0")
    run_script("train.py", [*args, "--max-iters", "3"])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "train/lo')  # a write that failed half-way
    again = run_script("train.py", [*args, "--max-iters", "5"])
    assert "metrics.jsonl: dropped 1 record(s) cut short by a write that failed" in again.stdout
    assert [r["iteration"] for r in run_metrics(out)] == [1, 2, 3, 3, 4, 5, 5]  # 3 and 5 log and evaluate


# -- evaluate.py's outputs -----------------------------------------------------------------------------------
@needs_root
def test_unwritable_outputs_are_refused_before_the_first_image(synthetic_root, trained, tmp_path, tmpfs):
    ro = tmpfs("8m", "ro")
    shutil.copy(trained, ro / "best.pt")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    base = ["--checkpoint", str(ro / "best.pt"), "--data-root", str(synthetic_root), "--device", "cpu",
            "--workers", "0"]
    t0 = time.monotonic()
    proc = run_script("evaluate.py", base, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --out-dir (by default the checkpoint's directory) {ro}: cannot write there (Read-only file "
        f"system); pass --out-dir with a writable directory."], proc.stderr
    (tmp_path / "afile").write_text("x")
    proc = run_script("evaluate.py", [*base, "--out-dir", str(tmp_path / "afile")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (f"error: --out-dir {tmp_path / 'afile'}: is a file, not "
                                                            f"a directory; pass a directory."), proc.stderr
    proc = run_script("evaluate.py", [*base, "--out-dir", str(tmp_path / "ok"), "--export-dir",
                                      str(ro / "pred")], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --export-dir {ro / 'pred'}: cannot write there")
    assert "mIoU" not in proc.stdout and not (tmp_path / "ok" / "metrics.json").exists()
    assert time.monotonic() - t0 < 60


@needs_root
def test_the_table_is_printed_even_when_a_write_fails_afterwards(synthetic_root, trained, tmpfs):
    small = tmpfs("64k")  # room for metrics.json, not for the pictures
    proc = run_script("evaluate.py", ["--checkpoint", str(trained), "--data-root", str(synthetic_root), "--device",
                                      "cpu", "--workers", "0", "--out-dir", str(small)], check=False)
    assert proc.returncode == 2 and "\nroad " in proc.stdout and "val: mIoU" in proc.stdout, proc.stdout
    assert json.loads((small / "metrics.json").read_text())["num_images"] == 5
    assert proc.stderr.count("\n") == 1 and "the scores are printed above" in proc.stderr, proc.stderr


# -- checkpoints that are not what they seem -----------------------------------------------------------------
@pytest.mark.parametrize("what", ["weights-in-a-dict", "bare-state-dict"])
def test_a_last_pt_with_only_model_weights_is_one_line(synthetic_root, trained, tmp_path, capsys, what):
    import torch

    out = tmp_path / "run"
    out.mkdir()
    weights = ckpt.load(trained)["model"]
    torch.save({"model": weights} if what == "weights-in-a-dict" else weights, out / "last.pt")  # saved by hand
    before = (out / "last.pt").read_bytes()
    status, err = run_main("train", _train_args(synthetic_root, out, "--max-iters", "2"), capsys)
    last = out / "last.pt"
    expected = (f"error: {last}: holds model weights but not the training state a resume needs (no config, "
                f"optimizer, scheduler, scaler, ...); it was not written by cityseg's train.py, or by another "
                f"version. Move it out of {out} to start a fresh run there, or start from its weights in another "
                f"directory with --init-from {last}." if what == "weights-in-a-dict" else
                f"error: {last}: a bare state dict (model weights alone), not a checkpoint written by cityseg's "
                f"train.py; to train from these weights, pass --init-from {last} with a new --out-dir (a run "
                f"directory holding it cannot resume: move it out of there).")
    assert status == 2 and err.strip().splitlines() == [expected], err
    assert (out / "last.pt").read_bytes() == before


# -- --images ------------------------------------------------------------------------------------------------
def test_images_keep_their_relative_paths_and_colliding_names_are_refused(trained, tmp_path):
    photos = tmp_path / "photos"
    for sub, size in (("front", (40, 60)), ("rear", (37, 53))):
        (photos / sub).mkdir(parents=True)
        cv2.imwrite(str(photos / sub / "0001.png"), np.random.default_rng(0).integers(0, 255, (*size, 3), np.uint8))
    cv2.imwrite(str(photos / "front" / "tiny.png"), np.zeros((1, 1, 3), np.uint8))  # 1x1, and scale 0.5 below
    out = tmp_path / "mine"
    proc = run_script("evaluate.py", ["--checkpoint", str(trained), "--images", f"{photos}/**/*.png", "--device",
                                      "cpu", "--out-dir", str(out), "--scales", "0.5,1.0"])
    assert "wrote colour overlays of 3 images" in proc.stdout
    written = sorted(str(p.relative_to(out / "overlays")) for p in (out / "overlays").rglob("*.png"))
    assert written == ["front/0001_overlay.png", "front/0001_pred.png", "front/tiny_overlay.png",
                       "front/tiny_pred.png", "rear/0001_overlay.png", "rear/0001_pred.png"]
    assert cv2.imread(str(out / "overlays" / "rear" / "0001_pred.png")).shape == (37, 53, 3)
    cv2.imwrite(str(photos / "front" / "0001.jpg"), np.zeros((8, 8, 3), np.uint8))
    proc = run_script("evaluate.py", ["--checkpoint", str(trained), "--images", str(photos / "front"), "--device",
                                      "cpu", "--out-dir", str(tmp_path / "clash")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --images {photos / 'front'}: {photos / 'front' / '0001.jpg'} and {photos / 'front' / '0001.png'} "
        f"would both be written as {tmp_path / 'clash' / 'overlays' / '0001'}_overlay.png; rename one of them, or "
        f"predict them separately."], proc.stderr
    assert not (tmp_path / "clash").exists()


# -- recipes -------------------------------------------------------------------------------------------------
def test_recipes_that_are_not_utf8_are_one_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# entraînement\nlr: 0.01\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", str(latin1), "--data-root", "x"])
    assert str(e.value) == (f"--config {latin1}: not UTF-8 text (byte 0xee on line 1, as Latin-1 or Windows-1252 "
                            f"editors write accented letters); save it as UTF-8.")
    utf16 = tmp_path / "notepad.yaml"
    utf16.write_text("lr: 0.01\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=r"UTF-16 text \(it starts with a UTF-16 byte-order mark\); save it as "
                                          r"UTF-8"):
        parse_config(["--config", str(utf16), "--data-root", "x"])
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufefflr: 0.02\n".encode("utf-8"))
    assert parse_config(["--config", str(bom), "--data-root", "x"]).lr == 0.02


def test_learning_rates_written_the_usual_way_are_numbers(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-4\nmin_lr: 1E-6\nweight_decay: 5e-4\nout_dir: ~/runs/x\ncache_dir: ~/cache\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = parse_config(["--config", str(recipe), "--data-root", "~/cityscapes"])
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay) == (1e-4, 1e-6, 5e-4)  # YAML 1.1 reads 1e-4 as a string
    home = str(tmp_path / "home")
    assert (cfg.out_dir, cfg.cache_dir, cfg.data_root) == (f"{home}/runs/x", f"{home}/cache", f"{home}/cityscapes")
    assert parse_config(["--lr", "1e-4", "--data-root", "x"]).lr == 1e-4
    recipe.write_text("lr: 1e-x\n")
    with pytest.raises(ConfigError, match=r"--lr: got '1e-x'; must be a number \(set in"):
        parse_config(["--config", str(recipe), "--data-root", "x"])
    cfg = parse_config(["--checkpoint", "~/runs/x/best.pt", "--export-dir", "~/pred", "--images", "~/p/*.jpg"],
                       EvalConfig)
    assert (cfg.checkpoint, cfg.export_dir, cfg.images) == (f"{home}/runs/x/best.pt", f"{home}/pred",
                                                            f"{home}/p/*.jpg")


# -- the decoded cache ---------------------------------------------------------------------------------------
def test_cache_problems_are_one_line_and_the_log_says_which_path_is_used(synthetic_root, tmp_path, tmpfs):
    from cityseg.prepare import prepare

    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    prepare(root, "train")
    ds = CityscapesDataset(root, "train")
    assert ds.cache is not None and ds.describe() == f"split train: 8 images, read from the decoded cache " \
                                                     f"{root / 'cityseg_cache' / 'train'}"
    images = root / "cityseg_cache" / "train" / "images.u8"
    size = images.stat().st_size
    with open(images, "r+b") as f:
        f.truncate(size // 2)  # a copy cut short
    with pytest.raises(DataError) as e:
        CityscapesDataset(root, "train")
    assert str(e.value) == (f"{images}: {size // 2} bytes, but the cache's index lists 8 images of {size} bytes in "
                            f"all; rerun `python -m cityseg.prepare` for this split, or pass --cache-dir none to "
                            f"read the PNGs.")
    assert CityscapesDataset(root, "train", cache_dir="none").describe() == "split train: 8 images, read from PNG files"
    with pytest.raises(DataError, match=rf"--cache-dir {tmp_path / 'typo'}: holds no decoded cache of split train"):
        CityscapesDataset(root, "train", cache_dir=tmp_path / "typo")
    if os.geteuid() == 0:
        ro = tmpfs("1m", "ro")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        proc = subprocess.run([os.sys.executable, "-m", "cityseg.prepare", "--data-root", str(root), "--cache-dir",
                               str(ro)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: --cache-dir {ro}: could not write the cache there (Read-only file system); pass a writable "
            f"--cache-dir with room for 4 bytes a pixel."], proc.stderr


# -- a DataLoader worker killed ------------------------------------------------------------------------------
def test_a_sigkilled_dataloader_worker_stops_the_run_at_a_completed_step(synthetic_root, tmp_path):
    out = tmp_path / "run"
    args = _train_args(synthetic_root, out, "--max-iters", "30", "--workers", "2", "--eval-every", "0",
                       "--ckpt-every", "100")
    with open(tmp_path / "first.log", "w") as log:
        proc = start_training(args, 0, log=log)
        wait_for_iteration(out, 3, proc)
        me = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                   if Path(f"/proc/{p}/cmdline").read_bytes() == me]  # forked: the same command line
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)  # what the OOM killer does
        rc = proc.wait(timeout=120)
    text = (tmp_path / "first.log").read_text()
    errors = _error_lines(text)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in text, text
    k = ckpt.load(out / "last.pt")["iteration"]
    assert errors[0] == (f"error: a DataLoader worker (pid {workers[0]}) was killed by SIGKILL, most likely by the "
                         f"kernel's out-of-memory killer. Training stopped and saved {out / 'last.pt'} at iteration "
                         f"{k}; lower --workers or --batch-size, or give the job more memory, and run the same "
                         f"command to resume.")
    again = run_script("train.py", args)
    assert f"Resumed from {out / 'last.pt'} at iteration {k}" in again.stdout and "done: 30 iterations" in again.stdout


# -- small ones ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, allowed", [("--nodes", "0", ">= 1"), ("--gpus-per-node", "-1", ">= 0"),
                                                 ("--timeout-min", "0", ">= 1")])
def test_submit_checks_its_cluster_options(tmp_path, flag, value, allowed):
    proc = run_submit([flag, value, "--dry-run", "--folder", str(tmp_path), "--", "--data-root", "x"])
    assert proc.returncode == 2 and proc.stderr == f"error: {flag}: got '{value}'; must be an integer {allowed}\n"


def test_ctrl_c_on_evaluate_is_one_line_and_status_130(synthetic_root, trained, tmp_path):
    from conftest import script_command

    # 16x16 windows every pixel: thousands of windows an image, so Ctrl-C lands while it works
    cmd, env = script_command("evaluate.py", ["--checkpoint", str(trained), "--data-root", str(synthetic_root),
                                              "--device", "cpu", "--workers", "1", "--out-dir", str(tmp_path),
                                              "--mode", "slide", "--window", "16x16", "--stride", "1x1"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "evaluate.py: interrupted (Ctrl-C).\n", err
    assert not (tmp_path / "metrics.json").exists()
