"""Ready for the machines users have, checked on a CPU: the CUDA paths on fake CUDA tensors (a
device-placement mistake fails here, not on a user's first GPU run), torch.compile without graph
breaks, no host sync in the hot loop, gradient accumulation, out-of-memory as one line, Windows and
macOS (no fcntl, spawned workers)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap

from pathlib import Path

import pandas as pd
import pytest
import torch
import cuda_standins as standins
from conftest import ROOT, SMALL, one_line_error_in_process, real_photos, run_cli, train
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

from common import engine as E
from common import transfer
from common.data import device_ops
from common.data.augment import EvalTransform, resolve_recipe
from common.data.streams import DeviceTrainStream
from common.distributed import DistInfo
from common.errors import UserError
from common.models import create_model
from common.specs import resolve_model

CUDA = standins.CUDA


@pytest.fixture
def fake_cuda(monkeypatch):
    """FakeTensorMode makes device="cuda" tensors on a machine without a GPU and raises on a
    CPU/CUDA mix; inside it, a counter of host syncs (tests/cuda_standins.py)."""
    with standins.fake_cuda(monkeypatch) as (mode, syncs):
        yield syncs


@pytest.mark.parametrize("recipe", ["reference", "light"])
def test_the_device_augmentation_runs_on_fake_cuda_tensors(recipe, monkeypatch):
    aug = device_ops.make_device_augment(resolve_recipe(recipe, re_prob=1.0), 224)
    plan = aug.sample(16, torch.Generator().manual_seed(0))  # the CPU draws, real tensors
    with standins.fake_cuda(monkeypatch):
        images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device=CUDA)
        out = aug.finish(aug.apply(images, plan))
        assert (out.device.type == "cuda" and out.shape == (16, 3, 224, 224)
                and out.dtype == torch.float32)


def test_the_device_stream_and_the_eval_transform_stay_on_the_device(fake_cuda):
    x, y = torch.zeros(64, 3, 32, 32, dtype=torch.uint8), torch.arange(64) % 10
    stream = DeviceTrainStream(x, y, resolve_recipe("reference"), 64, 16, 0, CUDA)
    standins.cpu_draws(stream.augment)
    batch, labels = next(iter(stream.epoch(0)))
    assert batch.device.type == labels.device.type == "cuda" and batch.shape == (16, 3, 64, 64)
    ev = EvalTransform(resolve_recipe("reference"),
                       224)(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device=CUDA))
    assert ev.device.type == "cuda" and ev.shape == (8, 3, 224, 224)


def test_a_cpu_tensor_in_a_cuda_computation_fails_here(fake_cuda):
    """The check that makes the tests above mean something: a forgotten .to(device) is caught."""
    x = torch.empty(4, 3, 8, 8, device=CUDA)
    with pytest.raises(Exception, match="same device|devices"):
        x * torch.ones(1, 3, 1, 1)  # a per-channel constant left on the CPU


@pytest.mark.parametrize("arch", ["resnet18", "tiny_vit_5m_224"])
def test_both_models_evaluate_on_fake_cuda_through_the_evaluator(arch):
    """The model's forward with fake CUDA weights (channels-last strides kept), fed by the
    Evaluator: eval transform, memory format and autocast on the device."""
    model = (create_model(resolve_model(arch, False), 224, 10).to(memory_format=torch.channels_last)
             .eval())
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=CUDA)
                for k, v in state.items()}

        class OnCuda(torch.nn.Module):
            def forward(self, x):
                return functional_call(model, fake, (x,))

        ev = E.Evaluator(EvalTransform(resolve_recipe("reference"), 224), 8, CUDA, torch.bfloat16,
                         True)
        logits = ev.logits(OnCuda(), torch.empty(8, 3, 32, 32, dtype=torch.uint8, device=CUDA))
        assert (logits.device.type == "cuda" and logits.shape == (8, 10)
                and logits.dtype == torch.float32)


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("arch", ["resnet18", "tiny_vit_5m_224"])
def test_the_compiled_training_step_has_no_graph_break(arch):
    """What --compile compiles: the forward and the loss under autocast (its backward compiled with
    it)."""
    model = create_model(resolve_model(arch, False), 32, 10)
    opt = E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, torch.device("cpu"))
    step = E.TrainStep(model, opt, E.build_scheduler(opt, 1, 0, 10), None,
                       torch.nn.CrossEntropyLoss(), None, torch.bfloat16, 0.0, True,
                       torch.device("cpu"))
    torch._dynamo.reset()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    explained = torch._dynamo.explain(step._forward_loss)(x, torch.arange(4))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_recompiles_nothing_after_the_first_epoch(
        cifar_dir, tmp_path, monkeypatch):
    """Two epochs with --compile on the CPU (inductor): the losses of eager, and not one new graph
    after epoch 1 (training batches, validation, its last partial batch, the test)."""
    from torch._dynamo.utils import counters

    from common import trainer

    graphs = []
    real = trainer.log_epoch
    monkeypatch.setattr(trainer, "log_epoch",
                        lambda *a: (graphs.append(counters["stats"]["unique_graphs"]),
                                    real(*a))[1])
    torch._dynamo.reset()
    counters.clear()
    flags = ["--model", "test_resnet", "--no-pretrained", "--epochs", "3", "--data-dir",
             str(cifar_dir), *SMALL, "--val-size", "390"]
    assert train("train_resnet_cifar", *flags, "--output-dir", str(tmp_path / "c"),
                 "--compile") == 0
    assert train("train_resnet_cifar", *flags, "--output-dir", str(tmp_path / "e")) == 0
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0] and graphs[0] >= 2, graphs
    compiled, eager = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("c", "e"))
    assert (compiled["train_loss"].to_numpy()
            == pytest.approx(eager["train_loss"].to_numpy(), rel=2e-3))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- host syncs

def test_the_hot_loop_reads_the_device_only_at_the_check_in(monkeypatch):
    """50 training steps from the device stream: every host read of a tensor (.item, .tolist,
    float(), int(), bool(), .cpu(), .numpy()) is counted with the function that made it. Only the
    check-in every 25 steps may read (and sample(), whose draws are CPU tensors by design)."""
    x, y = real_photos()
    x, y = x.repeat(4, 1, 1, 1), y.repeat(4)
    stream = DeviceTrainStream(x, y, resolve_recipe("reference"), 32, 16, 0, torch.device("cpu"))
    model = create_model(resolve_model("test_resnet", False), 32, 10)
    opt = E.build_optimizer(model, "adamw", 3e-4, 0.05, 0.9, 1.0, torch.device("cpu"))
    step = E.TrainStep(model, opt, E.build_scheduler(opt, 1, 0, 50), None,
                       torch.nn.CrossEntropyLoss(), None, None, 0.0, False, torch.device("cpu"))
    reads: list[str] = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            reads.append(sys._getframe(1).f_code.co_name)
            return real(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    steps, _ = E.train_one_epoch(step, stream.epoch(0), E.EpochSums.zeros(torch.device("cpu")),
                                 E.GracefulStop(), DistInfo())
    monkeypatch.undo()
    assert steps == 50
    # _get_value: torch.optim's CPU AdamW reads its step counter, a CPU tensor; on CUDA the fused
    # AdamW keeps it on the device and reads nothing
    allowed = ("_check_in", "sample", "sample_crops", "sample_erasing", "_get_value")
    outside = {f for f in reads if f not in allowed}
    assert not outside, f"host reads in the hot loop: {sorted(outside)}"
    assert reads.count("_check_in") == 3, "the check-ins at steps 25 and 50, and the epoch's last"


class ForwardOnly:
    """TrainStep's place in the loop on fake CUDA tensors (a backward needs a driver): the forward
    and the loss. TrainStep's own reads are counted on the CPU above."""

    def __init__(self, model):
        self.model, self.scheduler, self.at_update_boundary = model, None, True

    def __call__(self, x, y):
        logits = self.model(x.contiguous(memory_format=torch.channels_last))
        return torch.nn.functional.cross_entropy(logits, y).detach(), logits.detach()


@pytest.mark.parametrize("recipe", ["reference", "light"])
def test_the_training_loop_makes_no_host_sync_per_step_on_fake_cuda(recipe, monkeypatch):
    """The device pipeline at 224 px and the loop's metric sums on fake CUDA tensors, counted the
    wide way (tests/cuda_standins.py: reads of a CUDA value, copies from pageable CPU memory such
    as torch.tensor(list, device="cuda") or .to("cuda") of a fresh CPU tensor, data-dependent
    shapes): none in any step; the CPU draws go as one pinned, non-blocking copy per chunk of
    batches (and the epoch's order, once); the loop reads the device only at its check-in."""
    x, y = real_photos()
    x, y = x[:64], y[:64]  # 16 steps: every step the same, at a quarter of the dispatch time
    with standins.fake_cuda(monkeypatch) as (_, syncs):
        stream = DeviceTrainStream(x, y, resolve_recipe(recipe), 224, 4, 0, CUDA)
        standins.cpu_draws(stream.augment)
        step = ForwardOnly(standins.fake_cuda_model("test_resnet", 224))
        syncs.events.clear()
        steps, _ = E.train_one_epoch(step, stream.epoch(0), E.EpochSums.zeros(CUDA),
                                     E.GracefulStop(), DistInfo())
    assert steps == 16
    for kind in ("pageable copy", "data-dependent shape"):
        assert not syncs.count(kind), standins.describe(syncs.count(kind))
    assert not syncs.count("read", outside=("_check_in",)), standins.describe(
        syncs.count("read", outside=("_check_in",)))
    chunks = -(-steps // stream.chunk)
    assert len(syncs.count("pinned copy")) == chunks + 1, standins.describe(syncs.events)
    assert syncs.count("read"), "the check-in reads the sums (the counter sees reads)"


def test_validation_and_the_test_make_no_host_sync_per_batch_on_fake_cuda(monkeypatch):
    """The Evaluator (eval transform, model, loss and accuracy sums, the test's probabilities, the
    demo's predict) on fake CUDA tensors: the images and labels go as one pinned copy per call, and
    the host reads the results once at the end, the same for 2 batches as for 6."""
    x, y = real_photos()
    counts = []
    for batches in (2, 6):
        with standins.fake_cuda(monkeypatch) as (_, syncs):
            model = standins.fake_cuda_model("test_resnet", 224)
            ev = E.Evaluator(EvalTransform(resolve_recipe("reference"), 224), 8, CUDA, None, True)
            syncs.events.clear()
            ev(model, x[:8 * batches], y[:8 * batches])                       # validation
            ev(model, x[:8 * batches], y[:8 * batches], keep_probs=True)      # the final test
            ev.predict(model, x[:8 * batches])                                # the demo
        assert not syncs.count("pageable copy"), standins.describe(syncs.count("pageable copy"))
        assert not syncs.count("data-dependent shape")
        assert len(syncs.count("pinned copy")) == 3, standins.describe(syncs.events)
        counts.append(len(syncs.events))
    assert counts[0] == counts[1], f"host syncs grow with the batches: {counts}"


def test_the_cpu_draws_travel_packed_in_one_buffer_and_come_back_whole():
    """to_device's packing (on a GPU: one pinned buffer, one non-blocking copy per chunk), checked
    by value on the CPU: every dtype, shape, a non-contiguous and an empty tensor come back equal."""
    tensors = [torch.arange(5), torch.tensor([True, False, True]), torch.randn(2, 3).double(),
               torch.randn(4, 3).t(), torch.empty(0, 4, dtype=torch.long), torch.tensor(3.5),
               torch.randint(0, 255, (7,), dtype=torch.uint8), torch.randn(3).float()]
    buffer, spans = transfer.pack(tensors)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert all(start % 8 == 0 for start, _ in spans), "each tensor views back as its dtype"
    for t, back in zip(tensors, transfer.unpack(buffer, tensors, spans)):
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_a_resume_under_fewer_visible_gpus_restores_its_own_devices_rng(monkeypatch):
    """A run started on GPU 1 of a 4-GPU machine and resumed with one GPU visible (as run_suite.py
    pins runs with CUDA_VISIBLE_DEVICES): the checkpoint holds the state of the device the run
    trained on, and the resume puts it onto the one device it has (restoring all four states
    raised IndexError). A checkpoint of the older layout (a state per visible GPU) resumes too."""
    from common.checkpoint import capture_rng, restore_rng

    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    visible, restored = [4], []

    def index(device) -> int:
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    def set_rng_state(state, device="cuda"):
        if index(device) >= visible[0]:  # torch.cuda.default_generators[index]
            raise IndexError("tuple index out of range")
        restored.append((index(device), int(state[0])))

    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "get_rng_state", lambda device="cuda": states[index(device)])
        monkeypatch.setattr(module, "get_rng_state_all", lambda: states[:visible[0]])
        monkeypatch.setattr(module, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible[0])
    saved = capture_rng(torch.device("cuda", 1))
    assert torch.equal(saved["cuda"], states[1])
    visible[0] = 1
    restore_rng(saved, torch.device("cuda", 0))
    assert restored == [(0, 1)]
    restored.clear()
    restore_rng({**saved, "cuda": states}, torch.device("cuda", 0))  # the older layout
    assert restored == [(0, 0)]


def test_a_tinyvit_scored_after_a_weight_load_uses_the_loaded_attention_biases(monkeypatch):
    """timm's TinyViT caches its attention biases in eval mode; timm 1.0.9 to 1.0.20 cleared the
    cache only in train(), so the final test scored best.pt with the final epoch's biases. With that
    behaviour put back, a model evaluated, then loaded with other weights, must predict as a fresh
    model holding those weights."""
    from timm.models import tiny_vit

    from common.state import load_model_state

    def old_train(self, mode=True):  # timm <= 1.0.20
        torch.nn.Module.train(self, mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}

    monkeypatch.setattr(tiny_vit.Attention, "train", old_train)
    torch.manual_seed(0)
    final = create_model(resolve_model("tiny_vit_5m_224", False), 32, 10).eval()
    best = create_model(resolve_model("tiny_vit_5m_224", False), 32, 10).eval()
    with torch.no_grad():
        for p in best.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final(x)  # the last validation fills the cache
        load_model_state(final, best.state_dict(), "best.pt")
        assert torch.allclose(final(x), best(x), atol=1e-5), "the final test scored stale biases"


def test_evaluation_runs_in_true_fp32_on_a_gpu_while_training_may_use_tf32(monkeypatch):
    """The default GPU numerics (cuDNN autotuning, TF32 matmuls for training) do not reach
    evaluation: inside the Evaluator, TF32 is off for matmuls and convolutions, as the experiment's
    fp32 evaluation; after it, the training setting is back. --deterministic turns it all off and
    everything is restored when the run ends."""
    from common import runtime as R

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = R._backend_state()
    seen = []
    with R.backends(CUDA):
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        with standins.fake_cuda(monkeypatch):
            model = standins.fake_cuda_model("test_resnet", 32)
            model.fc.register_forward_hook(lambda *a: seen.append(
                (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
            x, y = real_photos()
            E.Evaluator(EvalTransform(resolve_recipe("reference"), 32), 100, CUDA)(model, x, y)
        assert seen == [(False, False)] * 2 and torch.backends.cuda.matmul.allow_tf32
    assert R._backend_state() == before
    with R.backends(CUDA, deterministic=True):
        assert (not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
                and not torch.backends.cuda.matmul.allow_tf32
                and not torch.backends.cudnn.allow_tf32
                and torch.are_deterministic_algorithms_enabled()
                and torch.is_deterministic_algorithms_warn_only_enabled())
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert R._backend_state() == before


def test_deterministic_is_a_recorded_flag_that_reaches_the_backends(tmp_path, monkeypatch):
    from common import trainer

    asked = []
    real = trainer.backends
    monkeypatch.setattr(trainer, "backends", lambda device, det: (asked.append((device.type, det)),
                                                                  real(device, det))[1])
    out = tmp_path / "run"
    assert train("train_resnet_cifar", "--model", "test_resnet", "--no-pretrained", "--dummy",
                 "--epochs", "1", "--img-size", "32", "--batch-size", "32", "--train-subset",
                 "64", "--val-size", "32", "--test-subset", "32", "--num-workers", "0",
                 "--deterministic", "--output-dir", str(out)) == 0
    assert asked == [("cpu", True)]
    assert json.loads((out / "config.json").read_text())["config"]["deterministic"] is True


def test_the_cuda_amp_branches_ask_for_their_dtype_and_drive_the_scaler(monkeypatch):
    """Fake CUDA tensors switch autocast and the GradScaler off without a word, so these branches
    are reached with recording stand-ins: the dtype each path asks autocast for on "cuda", and the
    GradScaler's calls in their order (scale, unscale_ before clipping, step, update)."""
    from unittest import mock

    from common import runtime as R

    asked = []
    monkeypatch.setattr(E, "autocast", lambda device, dtype: (
        asked.append((device.type, dtype)), contextlib.nullcontext())[1])
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: made.append(device) or "scaler")
    assert R.make_scaler(torch.float16, CUDA) == "scaler" and made == ["cuda"]
    assert R.make_scaler(torch.bfloat16, CUDA) is None and R.make_scaler(None, CUDA) is None

    model = create_model(resolve_model("test_resnet", False), 32, 10)
    opt = E.build_optimizer(model, "adamw", 1e-3, 0.05, 0.9, 1.0, torch.device("cpu"))
    calls = mock.MagicMock()
    calls.scale.side_effect = lambda loss: loss * 1.0
    step = E.TrainStep(model, opt, E.build_scheduler(opt, 1, 0, 10), calls,
                       torch.nn.CrossEntropyLoss(), None, torch.float16, 1.0, False, CUDA,
                       step_scheduler=False)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    step(x, y)
    assert asked == [("cuda", torch.float16)]
    assert [c[0] for c in calls.method_calls] == ["scale", "unscale_", "step", "update"]
    asked.clear()
    with mock.patch.object(opt, "step") as plain_step:
        E.TrainStep(model, opt, E.build_scheduler(opt, 1, 0, 10), None,
                    torch.nn.CrossEntropyLoss(), None, torch.bfloat16, 0.0, False, CUDA,
                    step_scheduler=False)(x, y)
    assert asked == [("cuda", torch.bfloat16)] and plain_step.call_count == 1
    asked.clear()
    with standins.fake_cuda(monkeypatch):
        fake = standins.fake_cuda_model("test_resnet", 32)
        images, labels = real_photos()
        for amp_eval in (None, torch.bfloat16):
            E.Evaluator(EvalTransform(resolve_recipe("reference"), 32), 200, CUDA, amp_eval)(
                fake, images, labels)
    assert asked == [("cuda", None), ("cuda", torch.bfloat16)], "fp32 evaluation by default"


# -------------------------------------------------------------------- gradient accumulation, memory

@pytest.mark.slow
def test_two_accumulated_micro_batches_of_32_are_one_batch_of_64(cifar_dir, tmp_path):
    """timm's test_vit (no BatchNorm, so accumulation is exact up to rounding): --batch-size 64
    --grad-accum-steps 2 gives the rows and weights of --grad-accum-steps 1, per epoch and per
    update schedule."""
    flags = ["--model", "test_vit", "--no-pretrained", "--epochs", "2", "--data-dir",
             str(cifar_dir), "--img-size", "32", "--num-workers", "0", "--val-size", "400",
             "--train-subset", "640", "--aug", "light", "--batch-size", "64"]
    for sched in ("epoch", "step"):
        a, b = tmp_path / f"b64_{sched}", tmp_path / f"b32x2_{sched}"
        assert train("train_resnet_cifar", *flags, "--sched-step", sched, "--grad-accum-steps",
                     "1", "--output-dir", str(a)) == 0
        assert train("train_resnet_cifar", *flags, "--sched-step", sched, "--grad-accum-steps",
                     "2", "--output-dir", str(b)) == 0
        ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
        for col in ("lr", "train_loss", "val_loss", "val_acc"):
            assert (mb[col].to_numpy()
                    == pytest.approx(ma[col].to_numpy(), rel=1e-4, abs=1e-6)), (sched, col)
        wa = torch.load(a / "last.pt", weights_only=True)["model"]
        wb = torch.load(b / "last.pt", weights_only=True)["model"]
        # rounding differs (a mean over 64 against two means over 32): measured 1e-5 after 20 AdamW
        # updates
        assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa), sched
        record = json.loads((b / "config.json").read_text())
        assert record["run"]["accum_steps"] == 2 and record["run"]["steps_per_epoch"] == 20


@pytest.mark.slow
def test_a_stop_waits_for_the_update_and_the_resumed_run_is_exact(cifar_dir, tmp_path):
    """Ctrl+C in the middle of an accumulation (the run's step 11, with 2 micro-batches per update)
    is taken at the update's end (step 12), so the checkpoint holds no half-accumulated gradient
    and --resume is exact."""
    from conftest import assert_same_run

    flags = ["--model", "test_resnet", "--no-pretrained", "--epochs", "2", "--data-dir",
             str(cifar_dir), "--img-size", "32", "--num-workers", "0", "--val-size", "160",
             "--train-subset", "320", "--batch-size", "32", "--grad-accum-steps", "2", "--device",
             "cpu"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert train("train_resnet_cifar", *flags, "--output-dir", str(straight)) == 0
    r = run_cli("train_resnet_cifar.py", *flags, "--output-dir", str(out),
                env={"CIFAR_FAILPOINT": "step:11@int"})
    assert r.returncode == 130 and "stopped in epoch 1 at step 12/20" in r.stderr, r.stderr[-1500:]
    assert train("train_resnet_cifar", *flags, "--output-dir", str(out), "--resume") == 0
    assert_same_run(straight, out, epochs=2)


# ----------------------------------------------------------------------------- GPU memory

def _memory_flags(cifar_dir, *extra):
    """A small run on the pipeline a GPU uses by default (SMALL's device pipeline, on the CPU)."""
    return ["--model", "test_resnet", "--no-pretrained", "--epochs", "2", "--data-dir",
            str(cifar_dir), *SMALL, "--train-subset", "640", *extra]


def _card_for(micro: int, cifar_dir, device_pipeline: bool = False) -> tuple[int, int]:
    """(free, total) bytes of a mocked GPU on which the memory model fits test_resnet at 32 px in
    micro-batches of `micro` images but not of twice that."""
    from common import memory as M
    from common.data.streams import default_chunk

    recipe = resolve_recipe("reference")
    model = create_model(resolve_model("test_resnet", False), 32, 10)
    costs = M.measure_costs(model, 32, None, None, recipe, device_pipeline, 1200, 500)
    chunk = default_chunk(recipe, 32) if device_pipeline else 1
    need = costs.train_bytes(micro, micro * chunk)
    assert costs.train_bytes(2 * micro, 1) > need, "a larger micro-batch needs more memory"
    free = int((need + M.HEADROOM) / M.SAFETY) + 1
    return free, 8 * 2**30


def test_a_small_gpu_gets_micro_batches_that_fit_and_the_same_update(cifar_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """A mocked card on which 32 images fit but 64 do not (the default --batch-size here is 64):
    the run trains in micro-batches of 32 x 2 accumulation steps, says so in one line, records it,
    and is the same run as one told --grad-accum-steps 2 (the update is unchanged)."""
    from common import trainer

    card = _card_for(32, cifar_dir)
    monkeypatch.setattr(trainer, "gpu_memory", lambda device: card)
    out, told = tmp_path / "auto", tmp_path / "told"
    # the cpu pipeline: on the device pipeline the plan also shrinks the augmentation chunk, and
    # the chunk's draws then differ (equal in distribution; design.md)
    assert train("train_resnet_cifar", *_memory_flags(cifar_dir, "--data-pipeline", "cpu"),
                 "--output-dir", str(out)) == 0
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("micro-batch")]
    assert len(line) == 1 and line[0].startswith(
        "micro-batch 32 x 2 accumulation steps = 64 per update"), err[-2000:]
    assert "chosen for" in line[0] and "GiB free" in line[0]
    run = json.loads((out / "config.json").read_text())["run"]
    assert (run["micro_batch"], run["accum_steps"]) == (32, 2) and run["memory"] == line[0]
    monkeypatch.undo()
    assert train("train_resnet_cifar", *_memory_flags(cifar_dir, "--grad-accum-steps", "2",
                                                      "--data-pipeline", "cpu"),
                 "--output-dir", str(told)) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").drop(columns=_TIMES),
                                  pd.read_csv(told / "metrics.csv").drop(columns=_TIMES))


_TIMES = ["epoch_time_s", "train_img_per_s", "val_img_per_s", "peak_mem_gb"]


def test_an_out_of_memory_error_in_the_first_epoch_halves_the_micro_batch_once(
        cifar_dir, tmp_path, capsys):
    """The memory model's choice does not fit after all (an out-of-memory error at step 3, from
    the failpoint): the run goes back to its start, trains in halved micro-batches with twice the
    accumulation steps, says so once, records it, and is the run that started that way."""
    out, told = tmp_path / "retried", tmp_path / "told"
    with _failpoint("step:3@oom"):
        assert train("train_resnet_cifar", *_memory_flags(cifar_dir), "--output-dir",
                     str(out)) == 0
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if ln.startswith("out of GPU memory")]
    assert said == ["out of GPU memory training epoch 1 with micro-batch 64: it starts again with "
                    "micro-batch 32 x 2 accumulation steps = 64 per update (the same update; "
                    "BatchNorm now sees 32 images)"], err[-2000:]
    run = json.loads((out / "config.json").read_text())["run"]
    assert (run["micro_batch"], run["accum_steps"]) == (32, 2) and "starts again" in run["memory"]
    assert train("train_resnet_cifar", *_memory_flags(cifar_dir, "--grad-accum-steps", "2"),
                 "--output-dir", str(told)) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv").drop(columns=_TIMES),
                                  pd.read_csv(told / "metrics.csv").drop(columns=_TIMES))
    assert (json.loads((out / "summary.json").read_text())["test_acc"]
            == json.loads((told / "summary.json").read_text())["test_acc"])


def test_an_out_of_memory_error_in_evaluation_halves_the_evaluation_batch(cifar_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    with _failpoint("eval@oom"):
        assert train("train_resnet_cifar", *_memory_flags(cifar_dir), "--epochs", "1",
                     "--output-dir", str(out)) == 0
    err = capsys.readouterr().err
    assert err.count("out of GPU memory validating epoch 1 with evaluation batch 256: it runs "
                     "again with 128") == 1, err[-2000:]
    assert json.loads((out / "config.json").read_text())["run"]["eval_batch"] == 128


@contextlib.contextmanager
def _failpoint(spec: str):
    os.environ["CIFAR_FAILPOINT"] = spec
    try:
        yield
    finally:
        os.environ.pop("CIFAR_FAILPOINT", None)


def test_out_of_memory_that_the_retry_cannot_fix_is_one_line_and_keeps_the_checkpoint(
        cifar_dir, tmp_path, monkeypatch, capsys):
    """With --grad-accum-steps fixed (or after the one retry) an out-of-memory error is one line
    that names the micro-batch and the flag that halves it; last.pt stays as it was, and the advice
    works: the same update in smaller micro-batches continues from the epoch boundary."""
    flags = _memory_flags(cifar_dir, "--grad-accum-steps", "1")
    out = tmp_path / "run"
    assert train("train_resnet_cifar", *flags, "--output-dir", str(out), "--stop-after-epoch",
                 "1") == 0
    before = (out / "last.pt").read_bytes()
    with _failpoint("step:11@oom"):
        one_line_error_in_process(
            lambda a: train("train_resnet_cifar", *a), [*flags, "--output-dir", str(out),
                                                        "--resume"],
            capsys, "out of GPU memory training epoch 2 of test_resnet at 32 px with micro-batch "
            "64 x 1 accumulation steps = 64 per update", "--grad-accum-steps 2 (then --resume)",
            "(epoch 1) is intact")
    assert (out / "last.pt").read_bytes() == before
    assert train("train_resnet_cifar", *_memory_flags(cifar_dir, "--grad-accum-steps", "2"),
                 "--output-dir", str(out), "--resume") == 0
    record = json.loads((out / "config.json").read_text())
    assert record["run"]["resumed"][-1] == "epoch 2 step 0 with micro-batch 32 x 2 accumulation steps"


# ----------------------------------------------------------------------------- Windows and macOS

WITHOUT_UNIX_MODULES = textwrap.dedent("""
    import runpy, sys
    sys.modules["fcntl"] = None      # as on Windows: importing it raises ImportError
    sys.modules["resource"] = None
    sys.path.insert(0, {root!r})
    import pathlib, importlib
    for p in sorted(pathlib.Path({root!r}, "common").rglob("*.py")):
        importlib.import_module(".".join(p.relative_to({root!r}).with_suffix("").parts).removesuffix(".__init__"))
    sys.argv = ["train_resnet_cifar.py", *{argv!r}]
    runpy.run_path({script!r}, run_name="__main__")
""")


@pytest.mark.slow
def test_every_module_imports_and_a_run_trains_without_fcntl_and_resource(cifar_dir, tmp_path):
    """As on Windows (no fcntl, no resource): filelock falls back to a lock file, which a finished
    run removes and a dead run's is taken over."""
    argv = ["--model", "test_resnet", "--no-pretrained", "--epochs", "1", "--data-dir",
            str(cifar_dir), *SMALL, "--output-dir", str(tmp_path / "run")]

    def run(*extra):
        return run_cli("-c", WITHOUT_UNIX_MODULES.format(
            root=str(ROOT), argv=[*argv, *extra], script=str(ROOT / "train_resnet_cifar.py")))

    r = run()
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert ((tmp_path / "run" / "summary.json").is_file()
            and not (tmp_path / "run" / ".lock").exists())
    (tmp_path / "run" / ".lock").write_text("")  # a lock file of a process that died holding it
    (tmp_path / "run" / ".lock.holder").write_text("pid 999999999 on "
                                                   + __import__("socket").gethostname()
                                                   + " since x\n")
    r = run("--resume")
    assert (r.returncode == 0 and "nothing to resume" in r.stderr
            and "took over the lock" in r.stderr), r.stderr[-2000:]


SPAWNED = textwrap.dedent("""
    import multiprocessing, runpy, sys
    multiprocessing.set_start_method("spawn", force=True)  # Windows' and macOS's default
    sys.argv = ["train_resnet_cifar.py", *{argv!r}]
    runpy.run_path({script!r}, run_name="__main__")
""")


@pytest.mark.slow
def test_a_run_and_its_resume_work_with_spawned_dataloader_workers(cifar_dir, tmp_path):
    """Spawned workers pickle the dataset and every transform (the reference recipe's patched
    posterize too), and a resume under spawn gives the run an uninterrupted one gives."""
    from conftest import assert_same_run

    flags = ["--model", "test_resnet", "--no-pretrained", "--epochs", "2", "--data-dir",
             str(cifar_dir), "--img-size", "32", "--batch-size", "64", "--val-size", "160",
             "--train-subset", "320", "--num-workers", "2", "--device", "cpu"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert train("train_resnet_cifar", *flags, "--output-dir", str(straight)) == 0
    script = str(ROOT / "train_resnet_cifar.py")
    r = run_cli("-c", SPAWNED.format(argv=[*flags, "--output-dir", str(out), "--stop-after-epoch",
                                           "1"],
                                     script=script))
    assert r.returncode == 0 and "stopped after epoch 1" in r.stderr, r.stderr[-2000:]
    r = run_cli("-c",
                SPAWNED.format(argv=[*flags, "--output-dir", str(out), "--resume"], script=script))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(straight, out, epochs=2)


def test_check_smoke_plans_every_gpu_case_and_reports_each_as_one_line(cifar_dir, tmp_path):
    """check.py --smoke: the GPU plan covers both models x both pipelines x bf16 / fp16, two
    interrupts with --resume, and --compile, at 224 px and the default batch, each counting its
    host syncs; the CPU plan is a short subset (4 cases) unless --smoke-all (10). A failing case is
    its line and the error's line, never a 'continue with' advice (a passing one: slow tier)."""
    from common.smoke import _last_error, plan, run_smoke

    cases = plan(str(cifar_dir), on_gpu=True, img_size=224)
    assert len(cases) == 2 * (2 * 2 + 2 + 1)
    flags = [" ".join(f) for c in cases for f, _ in c.steps]
    assert all("--device cuda" in f and "--img-size 224" in f and "--batch-size 128" in f
               for f in flags)
    assert sum("--data-pipeline device --amp-dtype fp16" in f for f in flags) == 2
    envs = [env for c in cases for _, env in c.steps]
    assert all(env.get("CIFAR_SYNC_CHECK") == "1" for env in envs)
    assert [e["CIFAR_FAILPOINT"] for e in envs if "CIFAR_FAILPOINT" in e] == [
        "step:5@term", "step:13@kill"] * 2
    assert len(plan(str(cifar_dir), on_gpu=False, img_size=32)) == 4
    assert len(plan(str(cifar_dir), on_gpu=False, img_size=32, full=True)) == 10
    out = []
    assert run_smoke(str(tmp_path / "missing.tar.gz"), False, 32, None, models=("test_resnet",),
                     only="device pipeline", emit=out.append) == 1
    assert out[0].startswith("smoke: 1 cases on the CPU at 32 px; about"), out
    assert "on a GPU it also checks bf16 and fp16" in out[1]
    assert out[2].startswith("FAIL test_resnet device pipeline fp32"), out
    assert "no such file" in out[3], out
    assert out[-1] == "smoke: 0 of 1 cases pass"
    assert _last_error("error: disk full\ncontinue with: python x --resume\n") == \
        "error: disk full"
    with pytest.raises(UserError, match="--smoke-only nope: no case's name contains it"):
        run_smoke(str(cifar_dir), False, 32, None, only="nope")


def test_an_interrupted_smoke_check_says_what_ran_and_leaves_nothing(cifar_dir, tmp_path,
                                                                     monkeypatch):
    """Ctrl+C (or SIGTERM, taken the same way) during the second case: a summary of what passed and
    what did not run, the temp folder removed, exit 130."""
    from common import smoke

    made = []
    real_mkdtemp = smoke.tempfile.mkdtemp
    monkeypatch.setattr(smoke.tempfile, "mkdtemp",
                        lambda prefix: made.append(real_mkdtemp(prefix=prefix,
                                                                dir=tmp_path)) or made[-1])

    def fake_case(case, folder, verbose=False):
        (folder / "big.bin").write_bytes(b"x" * 1000)
        if case.name.startswith("test_resnet SIGTERM"):
            raise KeyboardInterrupt
        case.result, case.seconds = "PASS", 1.0
        return case

    monkeypatch.setattr(smoke, "run_case", fake_case)
    out = []
    code = smoke.run_smoke(str(cifar_dir), False, 32, None, models=("test_resnet",),
                           emit=out.append)
    assert code == 130 and out[-1] == (
        "smoke: interrupted after 1 of 2 cases: 1 pass, 0 fail; not finished: test_resnet SIGTERM "
        "mid-epoch (step 5), then --resume"), out
    assert made and not Path(made[0]).exists()


def test_a_gpu_smoke_case_reports_syncs_memory_and_speed_and_a_sync_fails_it(tmp_path):
    """The figures of a GPU case from its run folder (written here as the trainer writes them): 0
    host syncs passes with peak memory against the card's and the memory model's and images/s; a
    sync in the training loop fails the case and says where. The closing line: whether the four
    runs fit (the memory model on the card's free memory) and how long they take."""
    from common.smoke import Case, fits_line, gpu_figures

    out = tmp_path / "case"
    out.mkdir()
    pd.DataFrame({"epoch": [1, 2], "peak_mem_gb": [2.0, 2.5], "train_img_per_s": [900.0, 5000.0],
                  "val_img_per_s": [8000.0, 10000.0]}).to_csv(out / "metrics.csv", index=False)
    (out / "config.json").write_text(json.dumps({"run": {"memory": "micro-batch 128 x 1 ... (peak "
                                                          "about 2.7 GiB by the memory model)"}}))
    (out / "sync_check.json").write_text(json.dumps({"steps": 12, "syncs": 0, "where": []}))
    case = Case("resnet18 device pipeline bf16", [], "x", result="PASS")
    gpu_figures(case, out, total_gib=79.2)
    assert case.result == "PASS" and case.notes == [
        "host syncs 0 in 12 steps", "peak 2.5 of 79.2 GiB (memory model 2.7)", "5,000 img/s"]
    (out / "sync_check.json").write_text(json.dumps({"steps": 12, "syncs": 3,
                                                      "where": ["augment.py:105"]}))
    failing = Case("resnet18 device pipeline bf16", [], "x", result="PASS")
    gpu_figures(failing, out, total_gib=79.2)
    assert failing.result == "FAIL: 3 host syncs in 12 training steps (at augment.py:105)"
    tinyvit = Case("tiny_vit_5m_224 device pipeline bf16", [], "x", result="PASS",
                   figures={"img_per_s": 2500.0, "val_img_per_s": 5000.0})
    line = fits_line([case, tinyvit], memory=(int(7.5 * 2**30), 8 * 2**30))
    # per run: 30 x (45,000 / 5,000 + 5,000 / 10,000) + 2 x 10,000 / 10,000 = 287 s (ResNet-18),
    # 30 x (18 + 1) + 4 = 574 s (TinyViT-5M); two runs each: 1,722 s = 0.5 h
    assert line == ("this GPU fits the four-run experiment at the defaults (micro-batch x "
                    "accumulation steps: ResNet-18 128 x 1, TinyViT-5M 64 x 2); the four 30-epoch "
                    "runs take about 0.5 h at these cases' images/s (224 px, batch 128; the "
                    "downloads and the decode aside)"), line


def test_the_sync_counter_counts_the_steps_syncs_and_not_the_check_in(monkeypatch):
    """CIFAR_SYNC_CHECK=1 on a GPU: CUDA's sync debug mode warns at a syncing op; the counter
    counts the warnings inside steps and the batches' making after 2 warm-up steps, and leaves the
    check-in (every 25 steps) alone. Stood in on the CPU: the debug mode and a syncing op."""
    import warnings

    from common import syncs as S

    mode = {"on": 0}
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(on=m))
    monkeypatch.setenv(S.ENV, "1")
    counter = S.HotLoopSyncs(torch.device("cuda"))

    def syncing_op():
        if mode["on"] == "warn":
            warnings.warn("called a synchronizing CUDA operation")

    class Step:
        model, scheduler, at_update_boundary = torch.nn.Linear(2, 2), None, True

        def __call__(self, x, y):
            if int(y[0]) in (0, 7, 30):  # steps 1, 8 and 31 sync
                syncing_op()
            return torch.tensor(1.0), torch.zeros(len(y), 2)

    real_check_in = E._check_in
    monkeypatch.setattr(E, "_check_in", lambda *a: (syncing_op(), real_check_in(*a))[1])
    batches = [(torch.zeros(1, 2), torch.tensor([i])) for i in range(50)]
    steps, _ = E.train_one_epoch(Step(), batches, E.EpochSums.zeros(torch.device("cpu")),
                                 E.GracefulStop(), DistInfo(), syncs=counter)
    assert steps == 50 and (counter.steps, counter.syncs) == (48, 2)


@pytest.mark.slow
def test_a_smoke_case_interrupted_and_resumed_passes(cifar_dir, tmp_path):
    from common.smoke import run_smoke

    out = []
    assert run_smoke(str(cifar_dir), False, 32, str(tmp_path / "keep"), models=("test_resnet",),
                     only="SIGTERM", emit=out.append) == 0
    assert out[2].startswith("PASS test_resnet SIGTERM mid-epoch (step 5), then --resume"), out
    assert "2 epochs" in out[2], out
    assert out[-1].startswith("smoke: 1 of 1 cases pass")
