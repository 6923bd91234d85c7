"""`lambdapipe bench --config`: a config's cells, their step and evaluation counts, the
published times beside them, and the projection's arithmetic; measured on CPU, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lambdapipe import project
from lambdapipe.cli import main
from lambdapipe.config import load_config, load_configs
from lambdapipe.errors import UserError
from lambdapipe.runtime import resolve

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
# CIFAR-10 rows of the published baseline table (RTX 3090), iter/min: the 8 runs.
PUBLISHED_RATE = {("resnet20x1", "fp32"): 4545, ("resnet20x2", "fp32"): 2439,
                  ("resnet20x4", "fp32"): 1132, ("resnet32x1", "fp32"): 2941,
                  ("resnet44x1", "fp32"): 2308, ("resnet56x1", "fp32"): 1840,
                  ("resnet18", "fp32"): 1327, ("resnet18", "fp16"): 2273}


def test_cifar10_baselines_are_eight_cells_of_48k_steps():
    cells = project.cells(load_config(CONFIG / "resnet_baselines.yaml"), ["cifar10"])
    assert [c.label for c in cells] == ["resnet20x1", "resnet20x2", "resnet20x4", "resnet32x1",
                                        "resnet44x1", "resnet56x1", "resnet18", "resnet18@fp16"]
    for c in cells:
        assert (len(c.runs), c.steps, c.evaluations) == (3, 48_000, 48)  # eval every 1000
        assert (c.train_size, c.val_size, c.image_size) == (45_000, 5_000, 32)
    one_seed = project.cells(load_config(CONFIG / "resnet_baselines.yaml"), ["cifar10"], [0])
    assert [len(c.runs) for c in one_seed] == [1] * 8


def test_published_times_come_from_the_source_of_each_cell():
    cells = project.cells(load_config(CONFIG / "resnet_baselines.yaml"), ["cifar10"], [0])
    seconds = {(c.model, c.recipe.precision): project.published_seconds(c, {}) for c in cells}
    assert seconds.keys() == PUBLISHED_RATE.keys()
    for key, rate in PUBLISHED_RATE.items():
        assert seconds[key] == pytest.approx(60 * 48_000 / rate)
    assert sum(seconds.values()) / 60 == pytest.approx(193.14, abs=0.01)

    # The community table gives epochs, not times; its ResNet-18 is not the baseline table's.
    for c in project.cells(load_config(CONFIG / "lambda_cifar10.yaml")):
        assert project.published_seconds(c, {}) is None, c.label
    # The Imagenette study reports a training time per model and noise rate.
    nette = {c.label: c for c in project.cells(load_config(CONFIG / "imagenette_noisy.yaml"))}
    assert project.published_seconds(nette["resnet18"], {}) == pytest.approx(
        (5557 + 7133 + 5557 + 5742) / 4)
    assert project.published_seconds(nette["lr18_l3_rpe"], {}) is None  # not in the report


def test_run_seconds_adds_launch_startup_training_and_evaluations():
    cell = project.cells(load_config(CONFIG / "resnet_baselines.yaml"), ["cifar10"], [0])[0]
    row = {"data_s": 2.0, "startup_s": 10.0, "iter_per_min_per_slot": 6000.0,
           "eval_images_per_s": 50_000.0, "ckpt_s": 0.5}
    parts = project.run_seconds(cell, row, launch_s=3.0)
    assert parts == {"launch_s": 5.0, "startup_s": 10.0, "train_s": 480.0,
                     "eval_s": 48 * (0.1 + 0.5), "run_s": 5.0 + 10.0 + 480.0 + 28.8}
    # The community recipe also scores the 10k test images at every evaluation (reported
    # as the source reads it, never used for selection): that is paid for too.
    lam = project.cells(load_config(CONFIG / "lambda_cifar10.yaml"))[0]
    assert lam.recipe.track_test_every_eval and lam.evaluations == 310
    eval_s = project.run_seconds(lam, row, launch_s=3.0)["eval_s"]
    assert eval_s == pytest.approx(310 * ((lam.val_size + 10_000) / 50_000 + 0.5))


def test_cli_projects_a_stand_in_config(tmp_path):
    out = tmp_path / "projection.json"
    files = ["--config", str(CONFIG / "resnet_baselines.yaml"),
             "--config", str(CONFIG / "ci" / "resnet_baselines.yaml")]
    result = CliRunner().invoke(main, ["bench", *files, "--slots", "1", "--warmup", "1",
                                       "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "projected wall time, 2 runs on 1 x cpu" in result.output
    saved = json.loads(out.read_text())
    rows = {r["model"]: r for r in saved["rows"]}
    assert rows.keys() == {"resnet18", "resnet18@fp16"}
    # digits stands in for cifar10: the published column reads CIFAR-10's rows, 20 steps
    assert rows["resnet18"]["published_run_s"] == pytest.approx(60 * 20 / 1327)
    assert rows["resnet18@fp16"]["published_run_s"] == pytest.approx(60 * 20 / 2273)
    assert saved["total_s"]["1"] == pytest.approx(sum(r["run_s"] for r in rows.values()))
    for r in rows.values():
        assert (r["steps"], r["evaluations"], r["runs"]) == (20, 2, 1)
        assert r["run_s"] == pytest.approx(r["launch_s"] + r["startup_s"] + r["train_s"]
                                           + r["eval_s"])
    assert saved["config"].endswith("ci/resnet_baselines.yaml")


@pytest.mark.parametrize(("args", "needle"), [
    (["--datasets", "mnist"], "invalid --datasets 'mnist': expected datasets of"),
    (["--seeds", "7"], "no run of the config is left to project"),
    (["--seeds", "x"], "invalid --seeds 'x'"),
    (["--gpus", "0"], "invalid --gpus 0"),
])
def test_bad_projection_arguments_are_one_line(args, needle):
    result = CliRunner().invoke(main, ["bench", "--config", str(CONFIG / "demo.yaml"),
                                       "--device", "cpu", "--steps", "1", "--warmup", "0",
                                       *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output.strip().splitlines()[-1]


def test_configs_merge_as_snakemake_merges_them(tmp_path):
    merged = load_configs([CONFIG / "resnet_baselines.yaml",
                           CONFIG / "ci" / "resnet_baselines.yaml"])
    assert list(merged["datasets"]) == ["digits"]  # the stand-in's shrink applied
    assert merged["train"]["device"] == "cpu"
    with pytest.raises(UserError, match="not found"):
        load_configs([tmp_path / "missing.yaml"])


def test_a_slot_count_that_fails_is_reported_and_the_others_still_project(monkeypatch):
    """Two copies of a big model may not fit on one GPU: that slot count is 'not possible',
    the one-slot projection still stands; a dead slot process is one line, not a hang."""
    from lambdapipe import bench

    real = project.measure_slots

    def oom_with_two(slots, **kw):
        if slots == 2:
            raise UserError("a benchmark slot failed: OutOfMemoryError: CUDA out of memory")
        return real(slots, **kw)

    monkeypatch.setattr(project, "measure_slots", oom_with_two)
    cfg = load_configs([CONFIG / "resnet_baselines.yaml", CONFIG / "ci" / "resnet_baselines.yaml"])
    result = project.project(cfg, seeds=[0], slots=[1, 2], warmup=0, steps=1)
    assert result["total_s"][2] is None and result["total_s"][1] > 0
    assert result["best_slots"] == 1
    text = project.format_projection(result)
    assert "failed: a benchmark slot failed: OutOfMemoryError" in text
    assert "2 run(s) per device at once: not possible" in text

    monkeypatch.setattr(bench, "_process", _die)
    with pytest.raises(UserError, match="slot died with exit code 3"):
        bench.measure_slots(2, name="resnet20x1", recipe=cfg_recipe(), dataset="digits",
                            warmup=0, steps=1, model_args={"base_width": 4})


def cfg_recipe():
    from lambdapipe.recipes import get_recipe

    return get_recipe("demo", {"batch_size": 8})


def _die(*args):
    import os

    os._exit(3)


def test_compile_prices_every_cell_compiled(monkeypatch):
    seen = []

    def fake(slots, **kw):
        seen.append(resolve(kw["recipe"], "cpu").compile)
        return {"data_s": 1.0, "startup_s": 30.0, "iter_per_min": 6000.0,
                "iter_per_min_per_slot": 6000.0, "eval_images_per_s": 1e4, "ckpt_s": 0.1,
                "peak_mem_gib": None, "device_name": "fake"}

    monkeypatch.setattr(project, "measure_slots", fake)
    cfg = load_config(CONFIG / "resnet_baselines.yaml")
    result = project.project(cfg, datasets=["cifar10"], seeds=[0], compile="reduce-overhead")
    assert seen == ["reduce-overhead"] * 8
    assert {r["compile"] for r in result["rows"]} == {"reduce-overhead"}
    project.project(cfg, datasets=["cifar10"], seeds=[0])
    assert seen[8:] == [None] * 8  # the config's own setting (off) otherwise
    # 8 runs, each 48k steps at 6000/min (8 min) + 48 evaluations + start-up, one GPU, 1 slot
    each = result["launch_s"] + 1.0 + 30.0 + 480.0 + 48 * (0.5 + 0.1)
    assert result["total_s"][1] == pytest.approx(8 * each)


def test_packed_seconds_price_each_cells_seeds_in_processes_of_pack_runs():
    cell = project.cells(load_config(CONFIG / "resnet_baselines.yaml"), ["cifar10"])[0]
    assert len(cell.runs) == 3 and cell.evaluations == 48
    one = {"data_s": 2.0, "startup_s": 10.0, "iter_per_min_per_slot": 6000.0,
           "eval_images_per_s": 50_000.0, "ckpt_s": 0.5}
    packed = {"data_s": 2.0, "startup_s": 12.0, "iter_per_min_per_run": 4000.0}
    lone = project.run_seconds(cell, one, launch_s=3.0)["run_s"]
    eval_s = 48 * (0.1 + 0.5)
    parts, total = project.packed_seconds(cell, one, packed, 3, launch_s=3.0)
    # one process: one launch (+ each run's data), one start-up, 48k steps at the per-run
    # rate of a pack of 3, and each run's own evaluations
    assert parts == {"launch_s": 3.0 + 3 * 2.0, "startup_s": 12.0, "train_s": 720.0,
                     "eval_s": pytest.approx(3 * eval_s),
                     "run_s": pytest.approx(9.0 + 12 + 720 + 3 * eval_s)}
    assert total == pytest.approx(parts["run_s"])
    # packs of 2: a process of 2 seeds and a lone run
    _, total2 = project.packed_seconds(cell, one, {**packed}, 2, launch_s=3.0)
    assert total2 == pytest.approx(3.0 + 2 * 2.0 + 12 + 720 + 2 * eval_s + lone)


def test_pack_projects_the_grid_with_each_cells_seeds_together(monkeypatch):
    seen = []

    def fake(pack, fuse=False, **kw):
        seen.append((pack, kw["name"], fuse))
        one = {"data_s": 1.0, "startup_s": 30.0, "iter_per_min": 6000.0,
               "iter_per_min_per_slot": 6000.0, "eval_images_per_s": 1e4, "ckpt_s": 0.1,
               "peak_mem_gib": None, "device_name": "fake"}
        return [one, {**one, "iter_per_min": 12_000.0, "iter_per_min_per_run": 4000.0,
                      "vs_one_run": 2.0}]

    monkeypatch.setattr(project, "measure_packed", fake)
    cfg = load_config(CONFIG / "resnet_baselines.yaml")
    result = project.project(cfg, datasets=["cifar10"], pack=3, gpus=2)
    assert [(p, f) for p, _, f in seen] == [(3, False)] * 8 and result["runs"] == 24
    # per cell one process of 3 seeds: launch, 3 runs' data, start-up, 48k steps at 4000/min
    # (12 min), 3 x 48 evaluations; 8 cells over 2 GPUs
    process = result["launch_s"] + 3 * 1.0 + 30.0 + 720.0 + 3 * 48 * (0.5 + 0.1)
    assert result["total_s"][1] == pytest.approx(8 * process / 2)
    text = project.format_projection(result)
    assert "24 runs on 2 x fake, each cell's seeds packed 3 to a process" in text
    assert text.splitlines()[2].split()[5] == "x3"
    with pytest.raises(UserError, match="invalid pack 2"):
        project.project(cfg, datasets=["cifar10"], pack=2, slots=[1, 2])
    fused = project.project(cfg, datasets=["cifar10"], pack=3, fuse=True)  # as train --fuse
    assert [f for _, _, f in seen[8:]] == [True] * 8
    assert "each cell's seeds packed 3 to a process (fused)" in project.format_projection(fused)


def test_cli_projects_a_packed_grid(tmp_path):
    files = ["--config", str(CONFIG / "resnet_baselines.yaml"),
             "--config", str(CONFIG / "ci" / "resnet_baselines.yaml")]
    out = tmp_path / "packed.json"
    result = CliRunner().invoke(main, ["bench", *files, "--pack", "2", "--warmup", "1",
                                       "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "each cell's seeds packed 2 to a process" in result.output
    saved = json.loads(out.read_text())
    assert saved["pack"] == 2 and {r["pack"] for r in saved["rows"]} == {2}
    # one seed per cell in the stand-in: each runs alone, at the one-run cost
    assert all(r["vs_one_run"] > 0 and r["iter_per_min_per_slot"] > 0 for r in saved["rows"])


def fake_row(seen):
    def fake(slots, **kw):
        seen.append((kw["recipe"].batch_size, kw.get("ranks", 1), kw["device"]))
        return {"data_s": 1.0, "startup_s": 30.0, "iter_per_min": 6000.0,
                "iter_per_min_per_slot": 6000.0, "eval_images_per_s": 1e4, "ckpt_s": 0.1,
                "peak_mem_gib": None, "device_name": "fake"}
    return fake


def test_a_run_on_two_gpus_is_priced_by_one_ranks_step_at_half_the_batch(monkeypatch,
                                                                          tmp_path):
    """`train.gpus: 2` with one GPU here: one rank's step measured at the per-rank batch, the
    two ranks assumed to step in parallel with no all-reduce (said so), each run holding 2 of
    the --gpus."""
    seen = []
    monkeypatch.setattr(project, "measure_slots", fake_row(seen))
    monkeypatch.setenv("LAMBDAPIPE_FAKE_GPUS", "1")  # a lock, and `cpu` handed out
    monkeypatch.setattr(project.torch.cuda, "device_count", lambda: 1)
    cfg = load_config(CONFIG / "resnet_baselines.yaml")
    cfg["train"]["gpus"] = 2
    assert project.ranks_here("cuda", 2) is None and project.ranks_here("cuda:0", 2) is None
    result = project.project(cfg, datasets=["cifar10"], seeds=[0], gpus=4, device="cuda",
                             lock_dir=tmp_path)
    cells = project.cells(cfg, ["cifar10"], [0])
    assert {c.recipe.batch_size for c in cells} == {256} and seen == [(128, 1, "cpu")] * 8
    assert {(r["ranks"], r["batch_size"], r["steps"]) for r in result["rows"]} == {
        (2, 256, 48_000)}  # the global batch and its iterations, as one GPU would run them
    assert result["measured_ranks"] == 1
    # 8 runs of 48k per-rank steps at 6000/min, two at once on 4 GPUs
    each = result["launch_s"] + 1.0 + 30.0 + 480.0 + 48 * (0.5 + 0.1)
    assert result["total_s"][1] == pytest.approx(8 * each / 2)
    text = project.format_projection(result)
    assert "8 runs on 4 x fake, each run on 2 of them (DDP), 1 run(s) per device" in text
    assert "measured: one rank's training step at its batch (the global batch / 2 ranks)" in text
    assert "all-reduce NOT included (a lower bound" in text
    assert "neither measured nor projected" not in text
    with pytest.raises(UserError, match="invalid gpus 1: the config's runs take 2 GPUs"):
        project.project(cfg, datasets=["cifar10"], seeds=[0])
    with pytest.raises(UserError, match="invalid pack 3 with runs on 2 GPUs"):
        project.ranks(cfg, 2, pack=3)
    cfg["train"]["gpus"] = 1  # one GPU per run: as before, and said so
    one = project.project(cfg, datasets=["cifar10"], seeds=[0], gpus=4)
    assert seen[8:] == [(256, 1, "cpu")] * 8 and {r["ranks"] for r in one["rows"]} == {1}
    assert one["total_s"][1] == pytest.approx(8 * (each - result["launch_s"] + one["launch_s"]) / 4)
    assert "a run on several GPUs (DDP) is neither measured nor projected yet" in \
        " ".join(project.format_projection(one).split())


def test_a_run_on_two_ranks_here_is_priced_by_its_measured_ddp_step(monkeypatch):
    """Where this machine holds the run's ranks (here: 2 gloo processes on the CPU), the
    2-rank step itself is measured at the global batch, all-reduce included, and said so."""
    seen = []
    monkeypatch.setattr(project, "measure_slots", fake_row(seen))
    cfg = load_config(CONFIG / "resnet_baselines.yaml")
    cfg["train"]["gpus"] = 2
    assert [project.ranks_here(d, 2) for d in ("cpu", "auto")] == ["cpu", "cpu"]
    result = project.project(cfg, datasets=["cifar10"], seeds=[0], gpus=4, device="cpu")
    assert seen == [(256, 2, "cpu")] * 8 and result["measured_ranks"] == 2
    # 8 runs of 48k steps of the 2-rank run at 6000/min, two runs at once on 4 GPUs
    each = result["launch_s"] + 1.0 + 30.0 + 480.0 + 48 * (0.5 + 0.1)
    assert result["total_s"][1] == pytest.approx(8 * each / 2)
    text = " ".join(project.format_projection(result).split())
    assert "measured: each cell's 2-rank DDP step (all-reduce included) on 2 processes" in text
    assert "NOT included" not in text and "one rank's training step" not in text
    with pytest.raises(UserError, match=r"invalid slots \[1, 2\] with runs of 2 ranks"):
        project.project(cfg, datasets=["cifar10"], seeds=[0], gpus=4, slots=[1, 2])


@pytest.mark.slow  # two cells, each a 2-rank step in 2 spawned gloo processes (~30 CPU-s)
def test_cli_projects_a_two_gpu_run_from_a_real_two_rank_step(tmp_path):
    two = tmp_path / "two.yaml"
    two.write_text("train: {gpus: 2}\n")
    files = ["--config", str(CONFIG / "resnet_baselines.yaml"),
             "--config", str(CONFIG / "ci" / "resnet_baselines.yaml"), "--config", str(two)]
    args = ["bench", *files, "--warmup", "1", "--steps", "2", "--device", "cpu"]
    refused = CliRunner().invoke(main, args)  # --gpus 1 cannot hold a run of 2 ranks
    assert refused.exit_code == 2 and "invalid gpus 1: the config's runs take 2 GPUs" in \
        refused.output.strip().splitlines()[-1]
    out = tmp_path / "two.json"
    result = CliRunner().invoke(main, [*args, "--gpus", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 runs on 2 x cpu, each run on 2 of them (DDP)" in result.output
    assert "2-rank DDP step (all-reduce included)" in " ".join(result.output.split())
    saved = json.loads(out.read_text())
    assert saved["ranks"] == saved["measured_ranks"] == 2
    assert {r["ranks"] for r in saved["rows"]} == {2}
    assert saved["total_s"]["1"] == pytest.approx(sum(r["run_s"] for r in saved["rows"]))
