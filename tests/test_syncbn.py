"""CPUSyncBatchNorm on 2 gloo processes equals plain BatchNorm on the concatenated batch; a missing peer raises."""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from cityseg.syncbn import CPUSyncBatchNorm, convert_sync_batchnorm
from conftest import free_port, spawn

C = 5
BATCHES = (3, 1)  # unequal per-rank batches: the statistics must weight ranks by their element counts


def _data(std: float = 3.0, mean: float = 1.5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(BATCHES), C, 6, 7, generator=g) * std + mean
    w = torch.randn(sum(BATCHES), C, 6, 7, generator=g)  # a fixed projection makes a non-trivial loss
    weight = torch.rand(C, generator=g) + 0.5
    bias = torch.randn(C, generator=g)
    return x, w, weight, bias


def _make_bn(cls, weight, bias):
    bn = cls(C, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _run_steps(bn, x, w, steps=2):
    """Two training-mode steps; returns output, input grad, parameter grads of the last one."""
    for _ in range(steps):
        xi = x.clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(xi)
        (y * w).sum().backward()
    return y.detach(), xi.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


def _worker(rank: int, world: int, port: int, out: str, moments: tuple[float, float]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w, weight, bias = _data(*moments)
        lo = sum(BATCHES[:rank])
        sl = slice(lo, lo + BATCHES[rank])
        bn = convert_sync_batchnorm(_make_bn(nn.BatchNorm2d, weight, bias), torch.device("cpu"),
                                    dist.new_group(backend="gloo"))  # a group of its own, as the trainer gives it
        assert isinstance(bn, CPUSyncBatchNorm)
        y, gx, gw, gb = _run_steps(bn, x[sl], w[sl])
        # DDP would sum parameter gradients over ranks; do the same here.
        dist.all_reduce(gw)
        dist.all_reduce(gb)
        torch.save({"y": y, "gx": gx, "gw": gw, "gb": gb, "rm": bn.running_mean, "rv": bn.running_var,
                    "eval": bn.eval()(x[sl])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(x, w, weight, bias, dtype):
    """Plain BatchNorm2d on the concatenated batch, in ``dtype``: every quantity the workers save."""
    bn = _make_bn(nn.BatchNorm2d, weight, bias).to(dtype)
    y, gx, gw, gb = _run_steps(bn, x.to(dtype), w.to(dtype))
    return {"y": y, "gx": gx, "gw": gw, "gb": gb, "rm": bn.running_mean, "rv": bn.running_var,
            "eval": bn.eval()(x.to(dtype)).detach()}


# (std, mean) of the input: an ordinary one, and one whose mean is 600 standard deviations from zero, where
# statistics taken as E[x^2] - E[x]^2 in fp32 lose the variance to cancellation (an error of 0.09 on outputs
# of magnitude 5.6 when tried).
# The yardstick is BatchNorm2d in fp64 on the concatenated batch; the synchronised one, in fp32 over two ranks,
# must be within 1e-5 of the largest value (about a hundred fp32 roundings) or twice PyTorch's own fp32 error.
@pytest.mark.parametrize("moments", [(3.0, 1.5), (0.5, 300.0)], ids=["plain", "large-mean"])
def test_cpu_syncbn_matches_batchnorm_on_concatenated_batch(tmp_path, moments):
    spawn(_worker, (2, free_port(), str(tmp_path), moments))
    data = _data(*moments)
    exact, native = _reference(*data, torch.float64), _reference(*data, torch.float32)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ours = {k: torch.cat([p[k] for p in parts]) for k in ("y", "gx", "eval")}
    for p in parts:  # parameter gradients (summed over ranks) and running statistics agree on both ranks
        ours.update({k: p[k] for k in ("gw", "gb", "rm", "rv")})
        for key, value in ours.items():
            err = (value.double() - exact[key]).abs().max().item()
            native_err = (native[key].double() - exact[key]).abs().max().item()
            scale = exact[key].abs().max().item()
            assert err <= max(2 * native_err, 1e-5 * scale), (key, err, native_err, scale)


def test_convert_replaces_every_batchnorm_and_keeps_state():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
    conv = convert_sync_batchnorm(net, torch.device("cpu"))
    bns = [m for m in conv.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 and all(isinstance(m, CPUSyncBatchNorm) for m in bns)
    assert torch.all(conv[1].running_mean == 0.25)


@pytest.mark.quick
def test_single_process_syncbn_is_batchnorm():
    x, w, weight, bias = _data()
    a = _run_steps(_make_bn(CPUSyncBatchNorm, weight, bias), x, w)
    b = _run_steps(_make_bn(nn.BatchNorm2d, weight, bias), x, w)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def test_channels_last_statistics_keep_nchw_accuracy():
    # Why CPU runs use our BatchNorm also in one process: PyTorch's channels_last CPU BatchNorm takes its
    # statistics with errors tens of times those of its NCHW kernel when the mean is large against the spread
    # (the trainer runs channels_last on CPU). Ours keeps the NCHW kernel's accuracy.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, 128, generator=g) + 10.0
    exact = nn.BatchNorm2d(8).double()(x.double())

    def error(y: torch.Tensor) -> float:
        return (y.double() - exact).abs().max().item()

    nchw = error(nn.BatchNorm2d(8)(x))
    native_channels_last = error(nn.BatchNorm2d(8)(x.contiguous(memory_format=torch.channels_last)))
    ours = error(CPUSyncBatchNorm(8)(x.contiguous(memory_format=torch.channels_last)))
    assert native_channels_last >= 10 * nchw, (native_channels_last, nchw)  # the claim in engine.py
    assert ours <= 2 * nchw, (ours, nchw)


def _missing_peer_worker(rank: int, port: int, out: str, peer_exits: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=2)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timeout)
    bn = CPUSyncBatchNorm(C, process_group=dist.new_group(backend="gloo", timeout=timeout))
    x = torch.randn(2, C, 4, 4)
    bn(x)  # one step together
    if rank == 1:
        if peer_exits:
            os._exit(0)  # dies without a word
        time.sleep(4)  # alive, but never takes its next step
        os._exit(0)
    t0 = time.monotonic()
    try:
        bn(x)
        message = "returned"
    except RuntimeError as e:
        message = str(e)
    with open(f"{out}/rank0.json", "w") as f:
        json.dump({"message": message, "seconds": time.monotonic() - t0}, f)
    os._exit(0)


@pytest.mark.parametrize("peer_exits", [True, False], ids=["peer-exits", "peer-stalls"])
def test_a_missing_peer_raises_instead_of_hanging(tmp_path, peer_exits):
    # The sums go through gloo, which raises when a peer's connection closes, and after the group's timeout
    # when a live peer never sends (the trainer's groups wait 30 minutes; here 2 seconds).
    spawn(_missing_peer_worker, (free_port(), str(tmp_path), peer_exits))
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["message"] != "returned"
    expected = ("closed by peer", "reset by peer") if peer_exits else ("Timed out",)
    assert any(e in result["message"] for e in expected), result["message"]
    assert result["seconds"] < 3.5  # the stalled peer exits after 4 s


# -- torch.compile traces the synchronised BatchNorm: no graph break, the collectives inside the graph ---------
def _launch_env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)


def _trace_worker(rank: int, port: int, out: str) -> None:
    """Every registered model as the trainer builds it on 2 processes (synchronised BatchNorm over its own gloo
    group, DDP), traced by dynamo: where the graph breaks, and which of the model's layers the graphs hold."""
    from collections import Counter

    from cityseg import distributed as du
    from cityseg.config import TrainConfig
    from cityseg.engine import build_model_for
    from cityseg.models import MODELS

    _launch_env(rank, port)
    ctx = du.init("cpu")
    found = {}
    for name in MODELS:
        cfg = TrainConfig(data_root="unused", model=name, width=8, decoder_channels="16,16,8,8,8",
                          encoder_weights="none", device="cpu")
        model, ddp = build_model_for(cfg, ctx)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(ddp)(torch.randn(2, 3, 64, 128).contiguous(memory_format=torch.channels_last))
        ops = Counter(str(op) for graph in explained.ops_per_graph for op in graph)
        found[name] = {
            "breaks": [b.reason.splitlines()[0] for b in explained.break_reasons],
            "where": sorted({f.filename for b in explained.break_reasons for f in b.user_stack}),
            "convs_traced": sum(n for op, n in ops.items() if "conv2d" in op or "conv_transpose2d" in op),
            "norms_traced": ops["cityseg.sync_batch_norm.default"],
            "convs": sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules()),
            "norms": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        }
    if rank == 0:
        with open(f"{out}/trace.json", "w") as f:
            json.dump(found, f)
    du.teardown()


def test_every_registered_model_compiles_with_synchronised_batchnorm_and_no_graph_break(tmp_path):
    """PyTorch's nn.SyncBatchNorm breaks the graph at every layer (pytorch/pytorch#161302), and a break inside a
    loop makes dynamo run the whole frame eagerly. Ours traces: every convolution and every BatchNorm (the
    synchronised operator, collectives inside) of each model is in the captured graphs, and the only splits are
    DDPOptimizer's, one per gradient bucket."""
    from cityseg.models import MODELS

    spawn(_trace_worker, (free_port(), str(tmp_path)))
    found = json.loads((tmp_path / "trace.json").read_text())
    assert set(found) == set(MODELS)
    for name, f in found.items():
        assert all(b.startswith("DDPOptimizer intentional graph-break") for b in f["breaks"]), (name, f)
        assert not any("cityseg" in where for where in f["where"]), (name, f["where"])
        assert f["convs_traced"] == f["convs"] > 0 and f["norms_traced"] == f["norms"] > 0, (name, f)


def _aot_worker(rank: int, port: int, out: str) -> None:
    """Three SGD steps of the classic U-Net on 2 processes, compiled through AOT autograd (forward and backward
    traced ahead of time, as inductor's are; the graphs run as traced) and eager, from the same weights and
    batches; the traced graphs' calls are counted."""
    from collections import Counter

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from cityseg import distributed as du
    from cityseg.config import TrainConfig
    from cityseg.engine import build_model_for

    _launch_env(rank, port)
    ctx = du.init("cpu")
    calls = {"forward": Counter(), "backward": Counter()}

    def recorded(kind):
        def compile_graph(gm, example_inputs):
            calls[kind].update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compile_graph

    backend = aot_autograd(fw_compiler=recorded("forward"), bw_compiler=recorded("backward"))
    cfg = TrainConfig(data_root="unused", width=8, device="cpu")
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(2, 3, 64, 128, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 19, (2, 64, 128), generator=g)) for _ in range(3)]
    weights = {}
    for kind in ("eager", "compiled"):
        model, ddp = build_model_for(cfg, ctx)
        forward = ddp if kind == "eager" else torch.compile(ddp, backend=backend)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in batches:
            sgd.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            sgd.step()
        weights[kind] = {k: v.clone() for k, v in model.state_dict().items()}
    if rank == 0:
        diff = max((weights["eager"][k].double() - v.double()).abs().max().item()
                   for k, v in weights["compiled"].items() if v.is_floating_point())
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        with open(f"{out}/aot.json", "w") as f:
            json.dump({"diff": diff, "norms": norms, "forward": calls["forward"], "backward": calls["backward"]}, f)
    du.teardown()


def test_aot_autograd_traces_the_collectives_of_forward_and_backward_and_trains_like_eager(tmp_path):
    spawn(_aot_worker, (free_port(), str(tmp_path)))
    found = json.loads((tmp_path / "aot.json").read_text())
    # every BatchNorm's synchronised operator in the forward graphs, and its backward in the backward graphs
    assert found["forward"]["cityseg.sync_batch_norm.default"] == found["norms"] == 18, found
    assert found["backward"]["cityseg.sync_batch_norm_backward.default"] == 18, found
    assert found["diff"] < 1e-5, found["diff"]  # the same computation, traced
