import json

import torch

from conftest import run_script


def json_rows(*args):
    """The JSON object of every stdout line of `python bench.py ARGS` (a non-JSON line fails the test)."""
    lines = run_script("bench.py", *args, timeout=120).stdout.splitlines()
    return [json.loads(line) for line in lines]


def ratios(row):
    return {key: value for key, value in row.items() if "ratio" in key}


def test_predict_prints_rates_and_their_ratio():
    rows = json_rows("predict", "--images", "4", "--arch", "resnet10t", "--img-size", "32")
    assert [row["bench"] for row in rows] == ["env", "predict"]
    row = rows[-1]
    assert row["images"] == 4 and row["report_images_per_s"] > 0 and row["project_images_per_s"] > 0
    # the two paths compute the same predictions (up to rare near-ties of the random-weight logits)
    assert row["same_argmax_fraction"] >= 0.75 and row["forward_batched_images_per_s"] > 0
    assert set(ratios(row)) == {"speed_ratio", "ceiling_ratio"} and min(ratios(row).values()) > 0


def test_ensemble_prints_times_and_their_ratios():
    rows = json_rows("ensemble", "--train-per-class", "2", "--epochs", "2")
    assert [row["bench"] for row in rows] == ["env", "ensemble"]
    row = rows[-1]
    assert row["members"] == 3 and row["train_images"] == 2 * 16 and row["epochs"] == 2
    assert set(ratios(row)) == {"head_epochs_ratio", "speedup_ratio"} and all(v > 0 for v in ratios(row).values())


def test_data_prints_per_core_and_loader_rates_with_the_cache():
    rows = json_rows("data", "--files", "32", "--img-size", "32", "--seconds", "0.05", "--workers", "1")
    assert [(row["bench"], row.get("mode")) for row in rows] == [
        ("env", None), ("data", "one process, per CPU-second"), ("data", "1 DataLoader workers")]
    per_core, loader = rows[1], rows[2]
    assert per_core["cache_size"] == 64 and per_core["cache_build_img_s"] > 0 and per_core["cache_megabytes"] > 0
    assert set(ratios(per_core)) == {"fused_over_report_ratio", "fused_gpu_worker_over_report_ratio",
                                     "fused_cached_over_report_ratio", "draft_decode_only_over_report_ratio",
                                     "wall_fused_over_report_ratio", "fused_cached_50_epochs_over_report_ratio"}
    # 32 px crops of 500-1000 px files are never enlarged; from the 64 px cache some are
    assert per_core["enlarged_crops_original_fraction"] == 0 < per_core["enlarged_crops_cached_fraction"] < 1
    assert set(ratios(loader)) == {"fused_over_report_ratio", "fused_gpu_worker_over_report_ratio",
                                   "fused_cached_over_report_ratio"}
    assert all(value > 0 for value in [*ratios(per_core).values(), *ratios(loader).values()])


def test_data_refuses_a_cache_smaller_than_the_images():
    result = run_script("bench.py", "data", "--img-size", "32", "--cache-size", "16", check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --cache-size 16 is below --img-size 32; use at least 32 (default: 64)")


def test_gpu_measurement_runs_in_its_cpu_form(capsys):
    """bench.py gpu's measurement on the CPU with tiny settings: the path a GPU runs, line by line."""
    import bench
    args = bench.get_args_parser().parse_args([
        "gpu", "--files", "32", "--arch", "resnet10t", "--img-size", "32", "--batch-size", "8", "--steps", "1",
        "--warmup", "1", "--epochs", "1", "--report-steps", "1", "--no-compile", "--workers", "0"])
    bench.measure_gpu(args, torch.device("cpu"))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["bench"] for row in rows] == ["env", "gpu", "gpu-projection"]
    measured, projection = rows[1], rows[2]
    assert measured["compile_skipped"] == "--no-compile" and measured["workers"] == 0
    assert min(measured[k] for k in ("synthetic_project_img_s", "synthetic_report_img_s", "loader_img_s",
                                     "real_project_img_s", "real_report_img_s", "eval_project_img_s")) > 0
    assert set(ratios(measured)) == {"real_over_synthetic_ratio", "synthetic_project_over_report_ratio",
                                     "real_project_over_report_ratio"}
    assert projection["total_hours"] > projection["train_hours"] > 0
