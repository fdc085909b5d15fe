"""The loop's pieces, each on tiny tensors: the lr schedule against hand-computed values, the
optimiser's class and weight decay, the AMP decision and the autocast/GradScaler paths, evaluation
in eval mode, the NaN stop, Ctrl+C handling."""
from __future__ import annotations

import math
import os
import signal
from unittest import mock

import pytest
import torch
from torch import nn

from common import engine as E
from common import runtime as R
from common.distributed import DistInfo
from common.errors import UserError

CPU = torch.device("cpu")


class Tiny(nn.Module):
    """conv + BatchNorm + a `fc` head: enough for weight decay groups, BN statistics and the
    head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_cosine_schedule_matches_hand_computed_values():
    s = E.CosineSchedule(total=100, warmup=10)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))  # = 0.5
    assert s(100) == pytest.approx(0.0) and s(200) == pytest.approx(0.0)
    floored = E.CosineSchedule(100, 0, floor=0.01)
    assert floored(0) == pytest.approx(1.0) and floored(100) == pytest.approx(0.01)
    assert floored(25) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_the_default_schedule_is_the_experiments_cosine_annealing_stepped_per_epoch():
    """CosineAnnealingLR(T_max=epochs, eta_min=0.01 lr), stepped once per epoch after validation:
    the lr each epoch trains at, epoch for epoch, also for the TinyViT script's floor (0.1) and a
    21-epoch run."""
    for epochs, ratio in ((30, 0.01), (30, 0.1), (21, 0.01)):
        model = Tiny()
        ours = E.build_scheduler(E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, CPU),
                                 epochs, 0.0, 351, per_epoch=True, floor=ratio)
        ref_opt = torch.optim.AdamW(Tiny().parameters(), lr=3e-4, weight_decay=0.05)
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=epochs,
                                                         eta_min=ratio * 3e-4)
        for _ in range(epochs):
            assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-9)
            ours.optimizer.step()
            ref_opt.step()
            ours.step()
            ref.step()


def test_a_retargeted_schedule_continues_from_the_current_factor_to_its_floor():
    s = E.CosineSchedule(100, 0, floor=0.01)
    at_40 = s(40)
    s.retarget(40, 200)  # --epochs raised on resume
    assert s(39) == pytest.approx(E.CosineSchedule(100, 0, floor=0.01)(39)), "the past is unchanged"
    assert s(40) == pytest.approx(at_40), "no jump"
    assert s(120) == pytest.approx(0.01 + (at_40 - 0.01) * 0.5) and s(200) == pytest.approx(0.01)
    assert all(s(t) >= s(t + 1) - 1e-12 for t in range(40, 200)), ("decays monotonically to the "
                                                                   "new end")


def test_the_scheduler_drives_the_optimizer_lr():
    model = Tiny()
    opt = E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, CPU)
    sched = E.build_scheduler(opt, epochs=2, warmup_epochs=0.5, updates_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3e-4 / 5) and lrs[4] == pytest.approx(3e-4)
    assert lrs[12] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert sched.get_last_lr()[0] == pytest.approx(0.0)


def test_adamw_decays_every_parameter_by_default_as_the_experiment():
    model = Tiny()
    opt = E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, CPU)
    assert type(opt) is torch.optim.AdamW
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert set(decay) == {id(p) for p in model.parameters()} and set(decay.values()) == {0.05}
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
    skip = E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, CPU, decay_norm_and_bias=False)
    decay = {id(p): g["weight_decay"] for g in skip.param_groups for p in g["params"]}
    assert decay[id(model.conv.weight)] == 0.05 and decay[id(model.fc.weight)] == 0.05
    for p in (model.conv.bias, model.bn.weight, model.bn.bias, model.fc.bias):
        assert decay[id(p)] == 0.0
    head = E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 10.0, CPU)
    assert [g["lr"] for g in head.param_groups
            if any(p is model.fc.weight for p in g["params"])] == [pytest.approx(3e-3)]
    frozen = Tiny()
    frozen.conv.weight.requires_grad_(False)
    assert all(p is not frozen.conv.weight
               for g in E.build_optimizer(frozen, "adamw", 1, 0, 0, 1, CPU).param_groups
               for p in g["params"])
    assert type(E.build_optimizer(model, "sgd", 0.1, 0.0, 0.9, 1.0, CPU)) is torch.optim.SGD


def test_our_optimizer_steps_exactly_as_adamw_over_model_parameters():
    """The experiment's AdamW(model.parameters(), lr=3e-4, weight_decay=0.05): the same weights
    after 5 steps."""
    torch.manual_seed(0)
    a = Tiny()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    ours = E.build_optimizer(a, "adamw", 3e-4, 0.05, 0.9, 1.0, CPU)
    ref = torch.optim.AdamW(b.parameters(), lr=3e-4, weight_decay=0.05)
    for i in range(5):
        x, y = (torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)),
                torch.arange(8) % 10)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-7, rtol=0), k


def test_the_cuda_optimizer_is_fused_adamw_and_steps_as_adamw():
    """On CUDA the optimizer is the fused AdamW (one kernel); its CPU kernel (torch >= 2.4) is the
    same algorithm, so the update is checked here against AdamW(model.parameters())."""
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    fused = E.build_optimizer(a, "adamw", 3e-4, 0.05, 0.9, 1.0, torch.device("cuda"))
    assert fused.defaults["fused"] is True
    ref = torch.optim.AdamW(b.parameters(), lr=3e-4, weight_decay=0.05)
    for i in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)), torch.arange(8)
        for model, opt in ((a, fused), (b, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), k


@pytest.mark.parametrize("amp,dtype,device,capability,expected", [
    (True, "auto", "cuda", (8, 0), torch.bfloat16), (True, "auto", "cuda", (7, 0), torch.float16),
    (True, "fp16", "cuda", (9, 0), torch.float16), (True, "bf16", "cuda", (7, 5), torch.bfloat16),
    (False, "auto", "cuda", (8, 6), None), (True, "auto", "cpu", (8, 0), None),
    (True, "bf16", "cpu", (7, 0), torch.bfloat16), (True, "fp16", "cpu", (7, 0), torch.float16)])
def test_amp_decision(amp, dtype, device, capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: ("GradScaler", device))
    assert R.resolve_amp(amp, dtype, torch.device(device)) == expected
    scaler = R.make_scaler(expected, torch.device(device))
    assert (scaler is not None) == (expected == torch.float16), "a GradScaler exactly for fp16"


@pytest.mark.parametrize("capability,gpu,native", [
    ((7, 0), "V100", False), ((7, 5), "T4 / RTX 20xx", False), ((8, 6), "RTX 30xx", True),
    ((8, 9), "RTX 4070", True), ((9, 0), "H100", True)])
def test_bf16_is_chosen_only_where_the_gpu_has_it_in_hardware(capability, gpu, native,
                                                              monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a V100 or T4 (it counts emulated bf16, slower
    than fp16 there): the decision reads the compute capability instead, and check.py says the
    same."""
    from common import readiness

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    assert R.native_bf16(cuda) is native, gpu
    assert R.resolve_amp(True, "auto", cuda) == (torch.bfloat16 if native else torch.float16), gpu
    line = readiness.bf16_line(cuda)
    assert line.startswith("bf16         native") if native else "fp16 + GradScaler" in line, line


def _step(model, amp_dtype, scaler, grad_clip=0.0, step_scheduler=True):
    opt = E.build_optimizer(model, "adamw", 1e-2, 0.05, 0.9, 1.0, CPU)
    sched = E.build_scheduler(opt, 1, 0, 10)
    return E.TrainStep(model, opt, sched, scaler, nn.CrossEntropyLoss(), None, amp_dtype, grad_clip,
                       False, CPU, step_scheduler=step_scheduler)


def test_a_bf16_step_runs_under_autocast_on_the_cpu():
    model = Tiny()
    seen = []
    model.fc.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"),
                                                                o.dtype)))
    before = model.fc.weight.detach().clone()
    loss, logits = _step(model, torch.bfloat16, None)(torch.randn(8, 3, 8, 8),
                                                      torch.randint(0, 10, (8,)))
    assert seen == [(True, torch.bfloat16)] and torch.isfinite(loss)
    assert (model.fc.weight.dtype == torch.float32
            and not torch.equal(before, model.fc.weight)), "fp32 master weights"


def test_the_fp16_path_goes_through_the_scaler():
    model = Tiny()
    scaler = mock.MagicMock()
    scaler.scale.side_effect = lambda loss: loss
    # the mocked scaler never calls optimizer.step(): no scheduler step after it either
    step = _step(model, None, scaler, grad_clip=1.0, step_scheduler=False)
    step(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    scaler.scale.assert_called_once()
    scaler.unscale_.assert_called_once_with(step.optimizer)  # before clipping
    scaler.step.assert_called_once_with(step.optimizer)
    scaler.update.assert_called_once()


def test_evaluate_uses_eval_mode_and_is_deterministic():
    torch.manual_seed(0)
    model = Tiny()
    model.train()
    model(torch.randn(16, 3, 8, 8))  # give BatchNorm non-trivial running statistics
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,))
    to_float = lambda x: x.float() / 255  # noqa: E731
    a = E.Evaluator(to_float, 16, CPU)(model, images, labels, keep_probs=True)
    b = E.Evaluator(to_float, 7, CPU)(model, images, labels, keep_probs=True)
    assert (torch.equal(model.bn.running_mean, stats[0])
            and torch.equal(model.bn.running_var, stats[1]))
    assert a["acc"] == b["acc"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["n"] == 50
    assert (torch.allclose(a["probs"], b["probs"], atol=1e-6)
            and torch.allclose(a["probs"].sum(1), torch.ones(50)))
    expected = (a["probs"].argmax(1) == labels).float().mean().item()
    assert a["acc"] == pytest.approx(expected)


def test_a_loss_that_stays_nan_stops_with_advice():
    model = Tiny()
    step = _step(model, None, None)
    batches = [(torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))] * 30
    with pytest.raises(E.NonFiniteLoss, match="NaN/Inf for 25 steps.*--lr"):
        E.train_one_epoch(step, batches, E.EpochSums.zeros(CPU), E.GracefulStop(), DistInfo())


def test_a_single_nan_batch_is_survived():
    model = Tiny()
    step = _step(model, None, None, step_scheduler=False)  # optimizer.step is mocked below
    good = (torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    batches = [good, (torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long)),
               good]
    sums = E.EpochSums.zeros(CPU)
    with mock.patch.object(step.optimizer, "step"):  # keep the weights finite after the bad batch
        steps, stopped = E.train_one_epoch(step, batches, sums, E.GracefulStop(), DistInfo())
    assert (steps, stopped) == (3, False) and float(sums.count) == 12


def test_ctrl_c_finishes_the_step_and_a_forwarded_copy_is_not_a_second_one():
    """Under torchrun a rank sees one Ctrl+C twice; only a later one quits at once. A fake clock, no
    sleeps. signal.raise_signal delivers to this thread before it returns (os.kill may land on
    another thread of the process and run the handler later, which made this test fail on a loaded
    machine)."""
    now = [100.0]
    # SIG_IGN in a background job started by a shell, else Python's
    before = signal.getsignal(signal.SIGINT)
    with E.GracefulStop(announce=False, echo_s=2.0, clock=lambda: now[0]) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the launcher forwarding the same keypress, 0 s later
        assert stop.requested and stop.signum == signal.SIGINT
        now[0] += 2.5
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler is restored"


def test_device_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert R.resolve_device("cuda").type == "cuda"
        return
    with pytest.raises(UserError, match="--device cuda but PyTorch sees no CUDA GPU"):
        R.resolve_device("cuda")


@pytest.mark.parametrize("capability,dtype", [((8, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_on_a_cuda_gpu_auto_picks_the_device_pipeline_native_amp_and_the_default_workers(
        monkeypatch, capability, dtype):
    """Mocked CUDA: every auto setting resolves as documented (the device pipeline, bf16 where the
    GPU has it natively else fp16, -1 workers = one per core at most 8), and an explicit flag
    wins; on the CPU: the cpu pipeline in fp32."""
    from common.config import TrainConfig
    from common.distributed import DistInfo as Dist

    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert R.default_workers() == 8
    cpu = R.resolve_runtime(TrainConfig().validate(), Dist())
    assert (cpu.device.type, cpu.pipeline, cpu.amp_dtype, cpu.num_workers) == ("cpu", "cpu", None,
                                                                               8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    rt = R.resolve_runtime(TrainConfig().validate(), Dist())
    assert (str(rt.device), rt.pipeline, rt.amp_dtype, rt.num_workers) == ("cuda:0", "device",
                                                                           dtype, 8)
    told = R.resolve_runtime(TrainConfig(data_pipeline="cpu", amp_dtype="fp16",
                                         num_workers=3).validate(), Dist())
    assert (told.pipeline, told.amp_dtype, told.num_workers) == ("cpu", torch.float16, 3)


# ----------------------------------------------------------------------------- Apple silicon (MPS)

@pytest.fixture
def a_mac(monkeypatch):
    """A Mac with Apple silicon, as PyTorch sees it: MPS available, no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_on_apple_silicon_auto_picks_mps_with_the_cpu_fed_pipeline_in_fp32(a_mac):
    """The MPS path is checked here with mocks only (no Mac has run it): auto picks the MPS device,
    the CPU-fed pipeline (the device pipeline's float64 ops do not run on MPS) and fp32, and what it
    cannot do is one line each."""
    from common.config import TrainConfig
    from common.distributed import DistInfo as Dist

    rt = R.resolve_runtime(TrainConfig().validate(), Dist())
    assert (rt.device.type, rt.pipeline, rt.amp_dtype) == ("mps", "cpu", None)
    assert R.resolve_device("mps").type == "mps"
    for flags, words in ((dict(data_pipeline="device"), "--data-pipeline device: its augmentation "
                          "computes in float64"),
                         (dict(amp_dtype="bf16"), "--amp-dtype bf16: mixed precision on MPS"),
                         (dict(compile=True), "--compile: torch.compile on MPS")):
        with pytest.raises(UserError, match=f"--device mps \\(Apple silicon\\): {words}"):
            R.resolve_runtime(TrainConfig(**flags).validate(), Dist())
    with pytest.raises(UserError, match="torchrun: several processes on MPS"):
        R.resolve_runtime(TrainConfig().validate(), Dist(0, 2, 0))
    assert R.resolve_runtime(TrainConfig(device="cpu").validate(), Dist()).device.type == "cpu"


def test_mps_asked_for_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device mps but PyTorch sees no Apple-silicon GPU"):
        R.resolve_device("mps")


# ----------------------------------------------------------------------------- accumulation

class _NoNorm(nn.Module):
    """A small model without BatchNorm, so that micro-batches and one batch see the same function."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("clip_factor", [0.0, 2.0, 0.01])
def test_n_accumulated_micro_batches_make_the_update_of_one_batch_n_times_the_size(optimizer,
                                                                                   clip_factor):
    """4 micro-batches of 8 against one batch of 32, three updates: the same weights. Under SGD the
    gradient's scale is the step's scale (a loss not divided by 4 steps 4 times as far), and with
    --grad-clip the norm clipped is the accumulated one: at twice the first gradient's norm (the
    true gradient passes, 4 times it would be clipped), and at 1% of it (always clipping)."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 3, 4, 4, generator=gen), torch.randint(0, 10, (32,), generator=gen))
            for _ in range(3)]
    probe = _NoNorm()
    nn.CrossEntropyLoss()(probe(data[0][0]), data[0][1]).backward()
    clip = clip_factor * float(torch.cat([p.grad.flatten() for p in probe.parameters()]).norm())
    weights = []
    for accum in (1, 4):
        model = _NoNorm()
        opt = E.build_optimizer(model, optimizer, 0.1 if optimizer == "sgd" else 1e-2, 0.0, 0.9,
                                1.0, CPU)
        sched = E.build_scheduler(opt, 1, 0, 3)
        step = E.TrainStep(model, opt, sched, None, nn.CrossEntropyLoss(), None, None, clip, False,
                           CPU, accum_steps=accum)
        for x, y in data:
            for k in range(accum):
                part = slice(k * 32 // accum, (k + 1) * 32 // accum)
                step(x[part], y[part])
        weights.append([p.detach().clone() for p in model.parameters()])
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(weights[0],
                                                                    _NoNorm().parameters()))
    assert moved > 1e-4, "the updates moved the weights"
    for a, b in zip(*weights):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), float((a - b).abs().max())
