"""A run: start or resume, the loop, evaluation, checkpoints, summary (the run directory is
rundir.py's, the step step.py's). Each epoch's order, crops and flips are drawn from a
generator seeded by (seed, epoch) (augment.py) and the learning rate is a pure function of
the step, so a run resumed from last.ckpt replays exactly the batches and rates of an unbroken
run. The test split is read once, after training, on the checkpoint val chose
(or test, under the community fork's protocol: protocol.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from lambdapipe import atomic, distributed, evaluate, feed, logs, rng, rundir, runlock
from lambdapipe import status as run_status
from lambdapipe.augment import DeviceImages, augmented_batch, plan_epoch
from lambdapipe.protocol import at_best, selection_score, tracks_test, training_split
from lambdapipe.recipes import Recipe, recipe_changes
from lambdapipe.rundir import RunState, TrainConfig, check_before_start
from lambdapipe.runtime import Runtime, resolve
from lambdapipe.step import Seat, Tally, build
from lambdapipe.validate import check_resume

SYNC_EVERY = 50  # steps between host syncs for the progress bar and the divergence check


# --------------------------------------------------------------------------- the loop
def run(cfg: TrainConfig, device: str = "cpu", progress: bool = False,
        callback: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or return the finished summary of) the run in `cfg.out`.

    `callback(row)` is called after every evaluation, once its checkpoints and metrics are
    on disk (an exception from it interrupts the run exactly like a kill would).
    """
    world = distributed.current()  # several processes: rank 0 owns and writes (distributed.py)
    if world is not None:
        distributed.check(world, cfg.recipe.batch_size, cfg.recipe.drop_last, cfg.recipe.compile)
    with contextlib.ExitStack() as owned:
        def lead() -> dict[str, Any] | None:
            owned.enter_context(runlock.own(cfg.out))  # one owner (a refusal leaves nothing)
            check_before_start(cfg)  # also refuses an --out that holds a different config
            return rundir.finished(cfg.out)

        done = distributed.decided(world, lead)
        if done is not None:
            return done
        rt = resolve(cfg.recipe, str(device), cfg.deterministic, world)
        with rt.kernels():
            return Run(cfg, rt, progress, callback).train()


class Run:
    """One run as an object, so that a fused pack can drive several (fuse.py): `start`,
    `advance` (`next_batch`, the step, `after_step`) until done, `finish`. `rt`: the runtime
    its caller resolved (a device name: resolved here); `label` prefixes its log lines."""

    def __init__(self, cfg: TrainConfig, rt: Runtime | str, progress: bool = False,
                 callback: Callable[[dict[str, float]], None] | None = None,
                 label: str = "", bar_position: int | None = None,
                 device_data: dict[tuple, DeviceImages] | None = None,
                 pack_size: int | None = None):
        self.rt = rt if isinstance(rt, Runtime) else resolve(cfg.recipe, rt, cfg.deterministic)
        self.cfg, self.progress, self.callback = cfg, progress, callback
        self.r, self.out = cfg.recipe, cfg.out
        self.device = self.rt.device
        self.label, self.bar_position = label, bar_position
        self.diverged_at: int | None = None
        # runs of one cell in one process hold its splits on the device once
        self.device_data = {} if device_data is None else device_data
        self.pack_size = pack_size  # a fused job's seeds (summary.json's `compile`)

    def log(self, msg: str) -> None:
        logs.emit(self.label + msg)

    def start(self) -> None:
        cfg, device, r, out = self.cfg, self.device, self.r, self.out
        self.started = time.perf_counter()
        train, val = rundir.load_splits(cfg, verify=False)  # checked by check_before_start
        train_name, train = training_split(r, train, val, cfg.noise)  # protocol.py
        config = rundir.run_config(cfg, train, device=device)
        from lambdapipe.provenance import record  # identity, code and GPU: config.json
        config.update(record(cfg.model, cfg.model_args, cfg.recipe.to_dict(), cfg.data_dir,
                             cfg.dataset))
        self.config = config
        logs.emit(f"recipe {r.name}: {r.description}")
        logs.emit(textwrap.fill(" ".join(f"{k}={v}" for k, v in r.to_dict().items()
                                        if k not in ("name", "description")),
                                width=100, initial_indent="  ", subsequent_indent="  "))
        self.steps_per_epoch = steps_per_epoch = r.steps_per_epoch(len(train.labels))
        self.total = total = r.total_steps(steps_per_epoch)
        self.eval_every = r.eval_interval(steps_per_epoch)

        torch.manual_seed(cfg.seed)
        model = evaluate.build_model(config)
        last = out / "last.ckpt"
        resume = last.exists()  # before build: on several processes DDP's start syncs ranks
        recorded = rundir.saved_config(out) if resume else None
        self.rt = rt = self.rt.with_model(model, config["data"]["image_size"],
                                          (recorded or {}).get("runtime"))
        config["runtime"] = rt.record()
        mean, std = (torch.tensor(config["data"][k], device=device) for k in ("mean", "std"))
        state = RunState()
        model, optimizer, step_fn = build(model, r, rt, mean, std)
        if resume:
            ckpt = evaluate.load_checkpoint(last, map_location=device)
            rundir.check_same_run(cfg, last, ckpt)
            check_resume(ckpt, last, optimizer=optimizer, scaler=step_fn.scaler, total=total,
                         state_fields=dataclasses.asdict(RunState()))
            evaluate.load_weights(model, ckpt["model"], str(last))
            optimizer.load_state_dict(ckpt["optimizer"])
            step_fn.scaler.load_state_dict(ckpt["scaler"])
            rng.restore(ckpt["rng"], device)
            state = RunState(**ckpt["state"])
            # The checkpoint is the truth: a kill between its rename and metrics.csv's left
            # the file one row short (or one ahead); rewrite it before anything else happens.
            if rt.lead:
                rundir.write_metrics(out, state.rows)
            self.log(f"resuming {out} at iteration {state.iteration} of {total}")
        elif rt.lead:
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_json(out / "config.json", config)
        self.session_start = time.perf_counter() - state.elapsed_s  # spans all sessions
        self.model, self.step_fn, self.state = model, step_fn, state
        self.seat = Seat(step_fn, pack_size=self.pack_size)
        self.mean, self.std = mean, std

        def on_device(split: str, images, pad: int = 0, whole: bool = False) -> DeviceImages:
            whole = whole and images.whole is not None  # crops from whole images (Imagenette)
            key = (str(cfg.data_dir), cfg.dataset, cfg.noise, split, pad, whole)
            if key not in self.device_data:
                self.device_data[key] = DeviceImages(
                    images.images, images.labels, images.clean_labels, device, pad=pad,
                    whole=(images.whole.pixels, images.whole.index) if whole else None)
            return self.device_data[key]

        if feed.is_stream(train):  # a JPEG index: decoded by worker processes (feed.py)
            self.train_data = feed.TrainStream(train, r, cfg.seed, self.rt.world, device,
                                               steps_per_epoch)
            self.val_data = feed.EvalStream(val, device, r.loader_workers, r.jpeg_decode)
            self.batch = lambda i: self.train_data.batch(*divmod(i, steps_per_epoch))
        else:
            self.train_data = on_device(train_name, train, r.crop_padding,
                                        r.resized_crop is not None)
            self.val_data = on_device("val", val)
            self.batch = batches(self.train_data, r, cfg.seed, device, rt.world)
        del train, val
        self.test_data = None
        if tracks_test(r):  # reported, or chosen on under select_on test (protocol.py)
            from lambdapipe.data import load_split

            self.test_data = feed.eval_split(cfg.data_dir, cfg.dataset, "test", device,
                                             r.loader_workers, r.jpeg_decode)
            if self.test_data is None:  # arrays
                self.test_data = on_device("test", load_split(cfg.data_dir, cfg.dataset, "test"))
        self.bar = tqdm(total=total, initial=state.iteration, disable=not self.progress,
                        file=sys.stderr, dynamic_ncols=True, unit="it", leave=False,
                        position=self.bar_position, desc=self.label.strip() or None)
        self.it = state.iteration
        self.window_start, self.window_it = time.perf_counter(), self.it

    def train(self) -> dict[str, Any]:
        """Start (or resume), train to the end and finish: the summary."""
        self.start()
        while self.advance():
            pass
        return self.finish()

    def advance(self) -> bool:
        """One step; False once nothing is left to train (the end, or a divergence)."""
        if self.done():
            return False
        x, y, y_clean = self.next_batch()
        self.step_fn(x, y, y_clean, self.lr, self.it)
        return self.after_step()

    def done(self) -> bool:
        return self.it >= self.total or self.diverged_at is not None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented batch of the current step (and its learning rate in `self.lr`)."""
        self.lr = self.r.lr_at(self.it, self.total, self.steps_per_epoch)
        return self.batch(self.it)

    def after_step(self) -> bool:
        """Count the step; when due, the host sync, divergence check and evaluation."""
        self.it = it = self.it + 1
        evaluate_now = it % self.eval_every == 0 or it == self.total
        if it % SYNC_EVERY and not evaluate_now:
            return True
        tally = self.seat.counts()  # the host sync point
        self.bar.update(it - self.bar.n)
        self.bar.set_postfix(loss=f"{tally.loss_sum / max(tally.images, 1):.3f}",
                             acc=f"{tally.correct / max(tally.images, 1):.3f}")
        if tally.first_nonfinite >= 0:
            self.diverged_at = int(tally.first_nonfinite)
            return False
        if evaluate_now and not self.rt.lead:  # rank 0 evaluates and writes alone
            self.seat.reset_tally()
        elif evaluate_now:
            self.seat.sync_into(self.model)  # a fused step's weights of this run
            self._evaluate(tally)
        return it < self.total

    def join(self, seat: Seat) -> None:
        """Train on in `seat` of a fused step that another loop drives."""
        self.seat = seat

    def _evaluate(self, tally: Tally) -> None:
        """Val (and test when tracked) metrics, the checkpoints and the metrics row."""
        r, it, lr, state, model, out = self.r, self.it, self.lr, self.state, self.model, self.out
        train_seconds = time.perf_counter() - self.window_start
        logits = evaluate.predict_split(model, self.val_data, self.mean, self.std, self.rt)
        val_metrics = evaluate.classification_metrics(logits, self.val_data.labels)
        row = {"iteration": it, "epoch": round(it / self.steps_per_epoch, 4), "lr": lr,
               "train_loss": tally.loss_sum / tally.images,
               "train_acc": tally.correct / tally.images,
               "train_clean_acc": tally.clean_correct / tally.images,
               "val_loss": val_metrics["nll"], "val_acc": val_metrics["accuracy"],
               "images_per_s": (it - self.window_it) * r.batch_size / max(train_seconds, 1e-9),
               "elapsed_s": time.perf_counter() - self.session_start}
        if self.test_data is not None:
            logits = evaluate.predict_split(model, self.test_data, self.mean, self.std, self.rt)
            row["tst_acc"] = evaluate.classification_metrics(logits,
                                                             self.test_data.labels)["accuracy"]
        state.rows.append(row)
        state.iteration, state.elapsed_s = it, row["elapsed_s"]
        state.skipped_steps += int(tally.skipped)
        self.seat.reset_tally()
        paths = [out / "last.ckpt"]
        runlock.check_still_owned(out)  # not into a directory removed, maybe re-owned
        if selection_score(r, row) > state.best_val_acc:  # val's, or test's (select_on)
            state.best_val_acc, state.best_iteration = selection_score(r, row), it
            paths.insert(0, out / "best.ckpt")
        evaluate.save_checkpoint({"config": self.config, "model": model.state_dict(),
                                  "optimizer": self.seat.optimizer_state(),
                                  "scheduler": {"schedule": r.schedule, "step": it, "lr": lr},
                                  "scaler": self.seat.scaler_state(),
                                  "rng": rng.snapshot(self.device),
                                  "iteration": it, "state": dataclasses.asdict(state)}, *paths)
        rundir.write_metrics(out, state.rows)
        if not self.progress:
            self.log(f"iter {it}/{self.total} epoch {row['epoch']:.2f} lr {lr:.3g} "
                      f"train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f} "
                      f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} "
                      f"{row['images_per_s']:.0f} img/s")
        if self.callback is not None:
            self.callback(row)
        self.window_start, self.window_it = time.perf_counter(), it

    def finish(self) -> dict[str, Any]:
        """Test on best.ckpt and summary.json; then the device data is let go."""
        self.bar.close()
        if self.diverged_at is not None:
            self.state.skipped_steps += int(self.seat.counts().skipped)
            self.log(f"diverged: non-finite loss at iteration {self.diverged_at}")

        summary = distributed.decided(self.rt.world, self._summarize)  # rank 0's, on every rank
        self.train_data = self.val_data = self.test_data = self.batch = None
        return summary

    def _summarize(self) -> dict[str, Any]:
        """summary.json, for solo and packed runs alike."""
        from lambdapipe.data import load_manifest
        from lambdapipe.models import count_params

        runlock.check_still_owned(self.out)
        cfg, r, state, diverged_at = self.cfg, self.r, self.state, self.diverged_at
        rows, best = state.rows, cfg.out / "best.ckpt"  # none if diverged before an evaluation
        # ImageNet-2012's extra test sets (test_v2, ImageNet-V2) are scored with test
        extra = load_manifest(cfg.data_dir, cfg.dataset).get("extra_tests", [])
        scores = evaluate.checkpoint_scores(best, ["test", *extra], cfg.data_dir, self.device) \
            if best.exists() else {}  # the only time the test splits are read
        test = scores.get("test")
        summary = {
            "model": cfg.model, "model_args": cfg.model_args, "dataset": cfg.dataset,
            "noise": cfg.noise, "seed": cfg.seed, "recipe": r.name, "precision": r.precision,
            "recipe_changes": recipe_changes(r), "image_size": self.config["data"]["image_size"],
            "params": count_params(self.model),
            "iterations": self.it if diverged_at is None else diverged_at,
            "val_acc": at_best(rows, state.best_iteration, "val_acc"),
            "select_on": r.select_on, "train_on": r.train_on,
            "best_iteration": state.best_iteration if state.best_iteration >= 0 else None,
            "tst_acc": test["accuracy"] if test else None,
            "tst_nll": test["nll"] if test else None, "ece": test["ece"] if test else None,
            "best_train_loss": min((x["train_loss"] for x in rows), default=None),
            "best_val_loss": min((x["val_loss"] for x in rows), default=None),
            "train_clean_acc": rows[-1]["train_clean_acc"] if rows else None,
            "tst_acc_best_seen": max((x["tst_acc"] for x in rows), default=None)
            if tracks_test(r) else None,
            "status": _status(diverged_at, rows, test), "diverged_at": diverged_at,
            **{f"{s}_acc": scores[s]["accuracy"] if scores else None for s in extra},
            "compile": self.seat.path, "skipped_steps": state.skipped_steps,
            # evaluations whose val loss was not finite while training was (eval-mode overflow)
            "nonfinite_val_evals": sum(not math.isfinite(x["val_loss"]) for x in rows),
            "iter_per_min": rundir.iter_per_min(rows, r.batch_size),
            "wall_time_s": time.perf_counter() - self.session_start,
            "session_time_s": time.perf_counter() - self.started,
        }
        summary = {k: v if not isinstance(v, float) or math.isfinite(v) else None
                   for k, v in summary.items()}  # strict JSON: a NaN val loss becomes null
        atomic.write_json(self.out / "summary.json", summary)
        return summary


def _status(diverged_at: int | None, rows: list[dict[str, float]],
            test: dict[str, Any] | None) -> str:
    """ok, diverged (training loss not finite), or non-finite: training was finite but the
    final evaluation (the last val pass, or test on best.ckpt) was not, so the run is no
    result (the report leaves it out of every mean and names it)."""
    if diverged_at is not None:
        return run_status.DIVERGED
    finals = ([rows[-1]["val_loss"]] if rows else []) + ([test["nll"]] if test else [])
    return run_status.OK if all(math.isfinite(v) for v in finals) else run_status.NON_FINITE


def batches(data: DeviceImages, r: Recipe, seed: int, device: str,
            world: distributed.World | None = None) -> Callable[[int], tuple]:
    """Step i's augmented batch as training draws it for `seed` (augment.py), each epoch's plan
    made once; on several processes this rank's slice of every global batch."""
    steps_per_epoch, plans = r.steps_per_epoch(len(data)), {}

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, step = divmod(i, steps_per_epoch)
        if epoch not in plans:
            plans.clear()
            plan = plan_epoch(len(data), seed, epoch, r.crop_padding, r.flip, device,
                              resized_crop=r.resized_crop, size=data.size, extents=data.extents)
            plans[epoch] = plan if world is None else \
                distributed.shard_plan(plan, r.batch_size, world)
        return augmented_batch(data, plans[epoch], step,
                               r.batch_size // (world.size if world else 1))
    return batch
