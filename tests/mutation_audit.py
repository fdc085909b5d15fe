"""Plant realistic bugs, one at a time, and report which ones the tests catch. Not part of the test
run:

    python tests/mutation_audit.py            # all mutations (about 11 minutes on 2 cores)
    python tests/mutation_audit.py lr adamw   # only those whose name contains a word

Each mutation replaces one snippet of one file (it must occur exactly once), runs the tests that
should catch it, and restores the file (also on Ctrl+C). A mutation that survives is a hole in the
tests: add a test that fails on it (design.md, "How we test")."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name, file, original snippet, planted bug, tests that must catch it
MUTATIONS = [
    ('best.pt saved every epoch', 'common/trainer.py',
     '            if improved:\n',
     '            if True:\n',
     'tests/test_train.py::test_best_pt_is_the_best_validation_epoch_and_the_one_tested'),
    ('best chosen by the lowest val acc', 'common/state.py',
     'if val_acc > self.acc:',
     'if val_acc < self.acc or self.acc < 0:',
     'tests/test_train.py::test_best_pt_is_the_best_validation_epoch_and_the_one_tested'),
    ('test scored with the last weights', 'common/trainer.py',
     '        load_model_state(model, best_ckpt["model"], str(out / RF.BEST))\n',
     '',
     'tests/test_train.py::test_best_pt_is_the_best_validation_epoch_and_the_one_tested'),
    ('resume resets the best-so-far', 'common/state.py',
     'self.best = Best(**ckpt["best"])',
     'self.best = Best()',
     'tests/test_train.py::test_a_resumed_run_keeps_its_best_epoch'),
    ('evaluation without model.eval()', 'common/engine.py',
     '        model.eval()\n        if dist.enabled:',
     '        if dist.enabled:',
     'tests/test_engine.py::test_evaluate_uses_eval_mode_and_is_deterministic'),
    ('validation drawn from the test images', 'common/data/splits.py',
     'val_images = source.test_x if val_size == 0 else source.train_x',
     'val_images = source.test_x',
     'tests/test_splits.py'),
    ('training keeps the validation images', 'common/data/splits.py',
     '    mask[val] = False\n',
     '',
     'tests/test_splits.py'),
    ('test subset is the first N', 'common/data/splits.py',
     '        test_idx = stratified_split(source.test_y, test_subset, split_seed + TEST_OFFSET)[1]',
     '        test_idx = test_idx[:test_subset]',
     'tests/test_splits.py'),
    ('CPU augmentation off', 'common/data/streams.py',
     '_SeededImages(images, labels, cpu_train_transform(recipe, img_size))',
     "_SeededImages(images, labels, lambda im: __import__('common.data.augment', "
     "fromlist=['x']).EvalTransform(recipe, img_size)(im[None])[0])",
     'tests/test_augment.py -k augmented'),
    ('device augmentation off', 'common/data/device_ops.py',
     '        x = resize_crops(images, p["crops"], self.size, self.recipe.interpolation, '
     'flips=p["flips"])\n',
     '        x = resize_crops(images, p["crops"] * 0 + torch.tensor([0, 0, 32, 32]), self.size, '
     'self.recipe.interpolation)\n        return normalize(x, self.recipe.mean, self.recipe.std)\n',
     'tests/test_augment.py -k augmented'),
    ('device RandAugment off', 'common/data/device_ops.py',
     '        for name, sel, magnitude, sign in p["plan"]:',
     '        for name, sel, magnitude, sign in []:',
     'tests/test_augment.py -k alike'),
    ('device erasing off', 'common/data/device_ops.py',
     '        if not len(p["erased"]):\n            return x\n        sel = p',
     '        if True:\n            return x\n        sel = p',
     'tests/test_augment.py -k alike'),
    ('labels misaligned on the device', 'common/data/streams.py',
     '            labels = self.labels[idx]\n',
     '            labels = self.labels[idx.roll(1)]\n',
     'tests/test_augment.py -k aligned'),
    ('CPU stream seeded by worker, not by sample', 'common/data/streams.py',
     '        random.seed(seed)  ',
     '        random.seed(torch.utils.data.get_worker_info().id if '
     'torch.utils.data.get_worker_info() else 0)  ',
     'tests/test_augment.py -k workers'),
    ('per-sample seeding clobbers the training RNGs', 'common/data/streams.py',
     '        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if '
     'in_main else None',
     '        saved = None',
     'tests/test_resilience.py -k ctrl_c'),
    ('an import cycle (augment <-> device_ops)', 'common/data/augment.py',
     '    def __call__(self, images: torch.Tensor) -> torch.Tensor:\n        x = resize',
     '    def __call__(self, images: torch.Tensor) -> torch.Tensor:\n        from .device_ops '
     'import erase  # noqa\n        x = resize',
     'tests/test_layout.py'),
    ('no centre crop at evaluation', 'common/data/resample.py',
     '    offset = int(round((resize_to - crop) / 2.0))',
     '    offset = 0',
     'tests/test_augment.py -k evaluation'),
    ('no cosine decay', 'common/engine.py',
     '(1.0 + math.cos(math.pi * min(1.0, progress)))',
     '2.0',
     'tests/test_engine.py'),
    ('warm-up ignored', 'common/engine.py',
     '        if k < self.warmup:',
     '        if False:',
     'tests/test_engine.py'),
    ('Adam instead of AdamW', 'common/engine.py',
     'torch.optim.AdamW(params',
     'torch.optim.Adam(params',
     'tests/test_engine.py'),
    ('no weight decay', 'common/engine.py',
     '"weight_decay": weight_decay if decay else 0.0',
     '"weight_decay": 0.0',
     'tests/test_engine.py'),
    ('no GradScaler for fp16', 'common/runtime.py',
     'return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None',
     'return None',
     'tests/test_engine.py'),
    ('autocast never entered', 'common/runtime.py',
     '    if dtype is None:\n        return contextlib.nullcontext()',
     '    if True:\n        return contextlib.nullcontext()',
     'tests/test_engine.py'),
    ('pretrained download ignored', 'common/models.py',
     '    elif choice.tag is not None:',
     '    elif False:',
     'tests/test_models.py -k downloaded'),
    ('non-atomic JSON writes', 'common/files.py',
     '    atomic_write(path, json.dumps(data, indent=2, default=str) + "\\n")',
     '    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\\n")',
     'tests/test_resilience.py -k atomically'),
    ('seed band line is not the mean', 'common/plots.py',
     '    mean = table.mean(axis=1)',
     '    mean = table.min(axis=1)',
     'tests/test_analysis.py -k seed'),
    ('McNemar one-sided', 'common/stats.py',
     '    return min(1.0, 2 * tail)',
     '    return min(1.0, tail)',
     'tests/test_analysis.py -k mcnemar'),
    ('Wilson with a 90% z', 'common/stats.py',
     'Z95 = 1.959963984540054',
     'Z95 = 1.645',
     'tests/test_analysis.py -k wilson'),
    ('ECE without the absolute value', 'common/stats.py',
     'total += sel.mean() * abs(acc - mean_conf)',
     'total += sel.mean() * (acc - mean_conf)',
     'tests/test_analysis.py -k ece'),
    ('gains unpaired (separate image draws)', 'common/stats.py',
     '            per_run = counts @ r.T / n ',
     '            per_run = rng.multinomial(n, np.full(n, 1 / n), size=b) @ r.T / n ',
     'tests/test_analysis.py -k bootstrap'),
    ('synthetic data called CIFAR-10', 'common/record.py',
     '            return "synthetic data (--dummy, not CIFAR-10)"',
     '            return "CIFAR-10 (synthetic)"',
     'tests/test_analysis.py -k synthetic'),
    ('mismatched runs compared silently', 'common/analysis.py',
     '    if differ and not allow_mismatch:',
     '    if False:',
     'tests/test_analysis.py -k mismatch'),
    ('mid-epoch resume without the RNG state', 'common/trainer.py',
     '        restore_rng(ckpt["rng"], rt.device, rt.dist.rank)',
     '        pass',
     'tests/test_resilience.py -k ctrl_c'),
    ('no run-folder lock', 'common/runfolder.py',
     '                lock.acquire()\n                break',
     '                break',
     'tests/test_resilience.py -k second_process'),
    ('rows past the checkpoint kept on resume', 'common/runfolder.py',
     '            elif int(epoch) > epochs_done:',
     '            elif False:',
     'tests/test_resilience.py -k sigkill_after'),
    ('stale temp files kept', 'common/files.py',
     '            tmp.unlink(missing_ok=True)\n            removed.append',
     '            removed.append',
     'tests/test_resilience.py -k temp_file'),
    ('resume restarts the schedule when --epochs grows', 'common/trainer.py',
     '        schedule.retarget(k, schedule_length(',
     '        k = 0 or k; schedule.total = (',
     'tests/test_resilience.py -k raising_epochs'),
    ("device erasing with a flat box, not the recipe's noise", 'common/data/device_ops.py',
     '        if self.recipe.re_mode == "pixel":',
     '        if False:',
     'tests/test_augment.py -k pixel_erasing'),
    ('the device crop resamples bilinear', 'common/data/device_ops.py',
     '        x = resize_crops(images, p["crops"], self.size, self.recipe.interpolation, '
     'flips=p["flips"])\n',
     '        x = resize_crops(images, p["crops"], self.size, "bilinear", flips=p["flips"])\n',
     'tests/test_behaviours.py -k bicubic'),
    ('the same augmentation every epoch', 'common/data/streams.py',
     '    return ((seed * 1_000_003 + epoch) * 10_000_019 + position)',
     '    return ((seed * 1_000_003 + 0) * 10_000_019 + position)',
     'tests/test_behaviours.py -k anew'),
    ('patience stops one epoch late', 'common/trainer.py',
     'state.best.since >= cfg.patience)',
     'state.best.since > cfg.patience)',
     'tests/test_behaviours.py -k patience'),
    ('label smoothing on by default', 'common/config.py',
     '    label_smoothing: float = opt(0.0,',
     '    label_smoothing: float = opt(0.1,',
     'tests/test_behaviours.py -k cross_entropy'),
    ('per-class accuracy is precision', 'common/analysis.py',
     '        mask = labels == c\n',
     '        mask = preds[0]["best_pred"].to_numpy() == c\n',
     'tests/test_behaviours.py -k recall'),
    # the classes of the audit of the sweep, the record, the reports, the data path and the loop
    ('a run trains with its position as its seed', 'common/suite.py',
     '"--train-subset", str(size), "--seed", str(seed), "--output-dir",',
     '"--train-subset", str(size), "--seed", str(list(seeds).index(seed)), "--output-dir",',
     'tests/test_suite.py -k seed_size'),
    ('every local run pinned to the first GPU', 'common/suite.py',
     'else (slot.gpu,))',
     'else (gpus[0],))',
     'tests/test_suite.py -k own_gpu'),
    ("a failure reported with an earlier attempt's error", 'common/suite.py',
     '    lines = lines[starts[-1] + 1:] if starts else lines\n',
     '',
     'tests/test_suite.py -k latest_attempt'),
    ('Slurm requeues a timed-out run 3 times (the default)', 'common/suite.py',
     'submitit.SlurmExecutor(folder=str(logs), max_num_timeout=30)',
     'submitit.SlurmExecutor(folder=str(logs))',
     'tests/test_suite.py -k slurm_path'),
    ('--train-subset out of the resume identity', 'common/config.py',
     'check=Range(0, 10_000_000, note="0 = all"), metavar="N", identity=True)',
     'check=Range(0, 10_000_000, note="0 = all"), metavar="N")',
     'tests/test_record_keys.py'),
    ('--label-smoothing out of the comparability keys', 'common/config.py',
     '                                 check=Range(0, 1, open_hi=True), identity=True, compare=True)',
     '                                 check=Range(0, 1, open_hi=True), identity=True)',
     'tests/test_record_keys.py'),
    ('a record of a newer format read as if current', 'common/record.py',
     '    if version == FORMAT or version == 2:',
     '    if isinstance(version, int) and version >= 2:',
     'tests/test_record_keys.py -k newer'),
    ("the size table shows the final epoch's accuracy", 'common/results_md.py',
     'f"{_pct(np.mean(s.test_acc()), 1)}"',
     'f"{_pct(np.mean(s.test_acc(final=True)), 1)}"',
     'tests/test_suite.py -k intervals_centre'),
    ("RandAugment's geometric ops one way only", 'common/data/device_ops.py',
     '                    level = m.double() / 10 * GEOMETRIC_SCALE[name] * s.double()',
     '                    level = m.double() / 10 * GEOMETRIC_SCALE[name]',
     'tests/test_augment.py -k both_ways'),
    ('accumulated losses not divided by the steps', 'common/engine.py',
     '            scaled = loss / self.accum_steps if self.accum_steps > 1 else loss',
     '            scaled = loss',
     'tests/test_engine.py -k accumulated'),
    ('the per-step scheduler before the optimizer', 'common/engine.py',
     '            self.optimizer.step()\n        if self.step_scheduler:\n'
     '            self.scheduler.step()',
     '            if self.step_scheduler:\n                self.scheduler.step()\n'
     '            self.optimizer.step()',
     'tests/test_behaviours.py -k schedules_lr'),
    ('--no-drop-last drops the last batch anyway', 'common/data/streams.py',
     'steps = (n // world) // self.local_batch if drop_last else -(-n // self.local_batch)',
     'steps = (n // world) // self.local_batch',
     'tests/test_behaviours.py -k partial_batch'),
    ('--data-pipeline auto picks the cpu pipeline on CUDA', 'common/runtime.py',
     '                else ("device" if device.type == "cuda" else "cpu"))',
     '                else "cpu")',
     'tests/test_engine.py -k cuda_gpu_auto'),
    ('the resolved workers not recorded', 'common/trainer.py',
     'rt.num_workers if stream.name == "cpu" else 0),',
     'cfg.num_workers if stream.name == "cpu" else 0),',
     'tests/test_train.py -k real_cifar10'),
    ('the suite reruns finished runs', 'run_suite.py',
     '{"done": "skipped"}.get(S.status_of(r), "queued")',
     '{}.get(S.status_of(r), "queued")',
     'tests/test_suite.py -k interrupted'),
]



def run(name, file, old, new, tests) -> tuple[str, float]:
    path = ROOT / file
    original = path.read_text()
    if original.count(old) != 1:
        return f"SNIPPET NOT FOUND ONCE ({original.count(old)}x): fix the audit", 0.0
    start = time.monotonic()
    try:
        path.write_text(original.replace(old, new))
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "",
               *tests.split()]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        verdict = "caught" if r.returncode != 0 else "SURVIVED"
    except subprocess.TimeoutExpired:
        verdict = "caught (timeout)"
    finally:
        path.write_text(original)
    return verdict, time.monotonic() - start


def main(words: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not words or any(w.lower() in m[0].lower() for w in words)]
    survived = 0
    for name, file, old, new, tests in chosen:
        verdict, seconds = run(name, file, old, new, tests)
        survived += verdict != "caught" and not verdict.startswith("caught")
        print(f"{verdict:<10} {seconds:5.0f} s  {name}  ({file})", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
