"""`vae-hf bench` runs on a CPU in seconds on a tiny config and writes its JSON (speed is reported,
never asserted)."""

import json
from types import SimpleNamespace

import torch

from conftest import tiny_overrides, write_images


def test_bench_writes_its_report(tmp_path, capsys):
    from vae_hf.cli import main

    images = tmp_path / "images"
    write_images(images, 4)  # an epoch of 2 steps: its end falls inside the timed steps
    out = tmp_path / "bench.json"
    overrides = tiny_overrides(images, tmp_path / "unused", **{"train.max_steps": 1})
    assert main(["bench", *overrides, "--steps", "3", "--warmup", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = SimpleNamespace(stdout=captured.out, stderr=captured.err)
    report = json.loads(out.read_text())
    # nothing said about the benchmark's own temporary runs (it used to print "VAE saved to <deleted folder>")
    assert "vae-hf-bench" not in result.stdout + result.stderr and "VAE saved" not in result.stdout
    # steps 2-4 are timed: the sample written after step 1, the export and checkpoint at step 2's epoch end
    expected_work = {"VAE exports": 1, "checkpoints": 1, "samples": 1, "evaluations": 0}
    assert report["periodic_work"] == {"disc_off": expected_work, "disc_on": expected_work}
    assert "periodic work inside the trainer's timed steps (discriminator off: 1 VAE exports, 1 checkpoints, " in (
        result.stdout
    )
    # the loader is timed over enough batches, cycling the 2-batch folder, not over one
    assert report["data_loader"]["batches_timed"] == 20 and report["data_loader"]["passes"] == 11
    for name in ("trainer_disc_off", "trainer_disc_on", "bare_disc_off", "bare_disc_on"):
        assert report[name]["s_per_step"] > 0 and report[name]["images_per_s"] > 0
        assert report[name]["steps_timed"] == 3  # after the warm-up, each trainer step paired with a bare one
    assert report["overhead_disc_on"] == report["trainer_disc_on"]["s_per_step"] / report["bare_disc_on"]["s_per_step"]
    assert report["flops_per_step_disc_on"] > 0
    assert report["mfu_disc_on"] is None and report["device"] == "cpu"  # a CPU's peak is not guessed
    assert report["data_loader"]["images_per_s"] > 0 and report["peak_memory_mb"]["process_max_rss"] > 0
    assert "| trainer / bare |" in result.stdout


def test_bench_memory_section_reports_every_batch_and_the_largest_that_fits(tmp_path):
    """Without a GPU the memory section is the fake-tensor estimate of the configured step (EMA shadow
    included); the largest batch is the last whose estimate fits the budget."""
    from vae_hf.config import load_config
    from vae_hf.models.vae import build_vae
    from vae_hf.perf.benchmark import markdown, memory_section
    from vae_hf.perf.memory import GIB, StepOptions, estimate_step_memory

    config = load_config(None, tiny_overrides(tmp_path / "unused", tmp_path / "out", **{"train.ema_decay": 0.99}))
    memory = memory_section(config, torch.device("cpu"), budget_gb=0.25)
    assert memory["method"].startswith("estimated") and memory["ema_included"]
    peaks = {(row["batch_size"], row["gradient_checkpointing"]): row["peak_gib"] for row in memory["rows"]}
    assert set(peaks) == {(batch, flag) for batch in (1, 4, 8) for flag in (False, True)}
    assert peaks[1, False] < peaks[4, False] < peaks[8, False] and peaks[8, True] < peaks[8, False]

    vae = build_vae(config.model, 32)
    vae_config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    ema = 4 * sum(value.numel() for value in vae.state_dict().values() if value.is_floating_point())

    def peak(batch: int) -> int:
        return (
            ema
            + estimate_step_memory(vae_config, 32, batch, gradient_checkpointing=False, options=StepOptions("no"))[
                "peak_bytes"
            ]
        )

    assert peak(8) / GIB == peaks[8, False]
    largest = memory["largest_batch"]["gradient_checkpointing_off"]
    assert peak(largest) <= 0.25 * GIB < peak(largest + 1)
    assert memory["largest_batch"]["gradient_checkpointing_on"] > largest
    table = markdown({"device": "cpu", "versions": {"torch": "x"}, "date": "d", "memory": memory})
    assert f"| off | {peaks[1, False]:.2f} |" in table and f"{largest} (in 0.2 GiB)" in table


def test_the_bare_step_is_a_whole_optimizer_step_of_accumulated_micro_batches(image_folder, tmp_path):
    """With accumulation the bare loop's "step" runs every micro-batch and updates once, like the trainer's."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from vae_hf.config import load_config
    from vae_hf.perf.benchmark import _first_batch, _floor_optimizer_step
    from vae_hf.train.trainer import Trainer

    overrides = tiny_overrides(image_folder, tmp_path / "run", **{"train.gradient_accumulation_steps": 3})
    trainer = Trainer(load_config(None, overrides))
    calls = {"decoder": 0, "discriminator": 0}
    trainer.vae.decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    trainer.discriminator.register_forward_hook(
        lambda *_: calls.__setitem__("discriminator", calls["discriminator"] + 1)
    )
    updates = []
    step = _floor_optimizer_step(trainer, _first_batch(trainer), disc_on=True)
    hook = register_optimizer_step_post_hook(lambda optimizer, *_: updates.append(optimizer))
    try:
        step()
    finally:
        hook.remove()
    assert calls == {"decoder": 3, "discriminator": 9}  # generator loss, real and fake, per micro-batch
    assert len(updates) == 2  # one VAE update and one discriminator update
    assert all(p.grad is None for p in trainer.vae.parameters())


def test_bench_times_the_loader_alone_without_building_a_model(image_folder, tmp_path, monkeypatch):
    import vae_hf.perf.benchmark as benchmark
    from vae_hf.config import load_config

    monkeypatch.setattr(benchmark, "Trainer", None)  # nothing of the training side may be built
    config = load_config(None, tiny_overrides(image_folder, tmp_path / "out", **{"data.num_workers": 1}))
    report = benchmark.benchmark(config, steps=3, speed=False, loader=True)
    assert report["data_loader"]["images_per_s"] > 0 and report["data_loader"]["batches_timed"] == 20
    assert report["data_loader"]["passes"] == 6  # 4 batches a pass; the first batch of all is not timed
    assert report["data_loader"]["workers"] == 1 and "trainer_disc_off" not in report
    assert "data loader (imagefolder, square at 32 px): " in benchmark.markdown(
        report
    ) and "(20 batches, 6 passes over the data)" in (benchmark.markdown(report))


def test_bench_with_nothing_to_measure_says_so(capsys):
    """`--no-speed` alone printed the device line and exited 0."""
    from vae_hf.cli import main

    assert main(["bench", "--no-speed"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vae-hf: error: --no-speed leaves nothing to measure; add --memory and/or --loader"
    )


def test_a_largest_batch_at_the_search_cap_is_not_reported_as_measured():
    from vae_hf.perf.benchmark import LARGEST_BATCH_CAP, markdown

    rows = [{"batch_size": 1, "gradient_checkpointing": flag, "peak_gib": 0.1} for flag in (False, True)]
    memory = {
        "method": "estimated",
        "resolution": 32,
        "rows": rows,
        "budget_gib": 24.0,
        "largest_batch": {"gradient_checkpointing_off": 100, "gradient_checkpointing_on": LARGEST_BATCH_CAP},
        "largest_batch_cap": LARGEST_BATCH_CAP,
    }
    table = markdown({"device": "cpu", "versions": {"torch": "x"}, "date": "d", "memory": memory})
    assert "| off | 0.10 | 100 (in 24.0 GiB) |" in table
    assert f"| on | 0.10 | ≥ {LARGEST_BATCH_CAP} (search cap) (in 24.0 GiB) |" in table


def test_bench_reports_what_each_latent_space_term_costs(image_folder, tmp_path):
    """Each term the recipe has on is timed switched off alone (the discriminator on), against the run with all."""
    from vae_hf.config import load_config
    from vae_hf.perf import benchmark

    overrides = {"model.decoder_noise_tau": 0.5, "loss.perceptual_weight": 0}
    config = load_config(None, tiny_overrides(image_folder, tmp_path / "unused", **overrides))
    with_all = {"trainer_disc_on": {"s_per_step": 10.0}, "bare_disc_on": {"s_per_step": 5.0}}
    costs = benchmark._latent_term_costs(benchmark._benchmark_config(config, tmp_path / "scratch", 3), 1, with_all)
    assert set(costs) == {"decoder_noise"}  # the terms the recipe has on, no other
    cost = costs["decoder_noise"]
    assert 0 < cost["bare_s_per_step_without"] < 5 and 0 < cost["trainer_s_per_step_without"] < 10
    assert cost["bare_extra_s_per_step"] == 5.0 - cost["bare_s_per_step_without"]
    assert "| decoder_noise | " in benchmark._latent_terms_table(costs)
