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
    rows = json_rows("predict", "--images", "4", "--arch", "resnet10t", "--img-size", "32", "--onnx")
    assert [row["bench"] for row in rows] == ["env", "predict"]
    row = rows[-1]
    assert row["images"] == 4 and row["report_images_per_s"] > 0 and row["project_images_per_s"] > 0
    # the two paths compute the same predictions (up to rare near-ties of the random-weight logits)
    assert row["same_argmax_fraction"] >= 0.75 and row["forward_batched_images_per_s"] > 0
    # --onnx: the exported model on predict's path, taking turns with torch, gives torch's logits
    assert min(row[f"onnx_{key}images_per_s"] for key in ("", "torch_", "forward_", "forward_torch_")) > 0
    assert 0 <= row["onnx_max_abs_logit_diff"] < 1e-4
    assert set(ratios(row)) == {"speed_ratio", "ceiling_ratio", "onnx_over_torch_ratio",
                                "onnx_forward_over_torch_ratio"} and min(ratios(row).values()) > 0


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


def write_idx(path, array):
    """A gzipped IDX file (the MNIST format) holding a uint8 array."""
    import gzip
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_layout_is_the_competitions_disjoint_and_seeded(tmp_path):
    import numpy as np
    import fashion_mnist
    import data
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    # image i of the train split holds the value i % 251 everywhere, so a file tells which image it is
    train_labels = np.repeat(np.arange(10, dtype=np.uint8), 6)
    train_images = np.stack([np.full((28, 28), i % 251, np.uint8) for i in range(60)])
    write_idx(source / "train-images-idx3-ubyte.gz", train_images)
    write_idx(source / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(source / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28), dtype=np.uint8))
    write_idx(source / "t10k-labels-idx1-ubyte.gz", np.repeat(np.arange(10, dtype=np.uint8), 3))
    assert np.array_equal(fashion_mnist.read_idx(source / "train-images-idx3-ubyte.gz"), train_images)

    def layout(out, seed):
        fashion_mnist.write_layout(out, train_per_class=3, val_per_class=2, test_per_class=2, seed=seed,
                                   source_dir=source)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first = layout(tmp_path / "a", 0)
    assert first == layout(tmp_path / "b", 0) and first != layout(tmp_path / "c", 1)
    train_paths, train_y, class_names = data.load_split(tmp_path / "a", "train")
    val_paths, val_y, _ = data.load_split(tmp_path / "a", "val", class_names)
    assert class_names == [str(c) for c in range(10)]
    assert np.bincount(train_y).tolist() == [3] * 10 and np.bincount(val_y).tolist() == [2] * 10
    assert not {p.name for p in train_paths} & {p.name for p in val_paths}  # disjoint images
    for path, label in zip(train_paths, train_y):  # each file is the image its name says, in its class
        index = int(path.stem)
        assert train_labels[index] == label and first[f"train/{label}/{path.name}"] == path.read_bytes()
    labels = (tmp_path / "a" / "test_labels.csv").read_text().splitlines()
    assert labels[0] == "image_name,label" and len(labels) == 21
    assert sorted(p.stem for p in (tmp_path / "a" / "test").iterdir()) == sorted(r.split(",")[0] for r in labels[1:])


def test_accuracy_without_the_dataset_is_a_one_line_error(tmp_path):
    result = run_script("bench.py", "accuracy", "--work-dir", tmp_path / "work", "--fashion-mnist", tmp_path,
                        check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {tmp_path / 'train-images-idx3-ubyte.gz'} is missing: install Debian's dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or point --fashion-mnist at its folder")


def test_accuracy_summary_is_mean_and_spread_over_seeds():
    import bench
    summary = bench.summarize([{"seed": 0, "acc": 50.0}, {"seed": 1, "acc": 54.0}, {"seed": 2, "acc": 52.0}])
    assert summary == {"acc": {"mean": 52.0, "std": 2.0, "min": 50.0, "max": 54.0}}
