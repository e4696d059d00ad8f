"""Stage one end to end on tiny fake encoders and real JPEGs: values against a float64 numpy
reference, dedup, resume after a crash, two ranks, refusals, bad images, perturbations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from molt_cache.cache.manifest import CacheMismatchError
from molt_cache.datasets.base import DatasetError, DatasetReader, ImageRef, Sample
from molt_cache.encoders.base import EncoderIdentity, EncoderOutput, ImageEncoder, TextEncoder
from molt_cache.extract import ExtractConfig, _text_batches, extract

torch.set_num_threads(1)
WIDTH = 8


# ------------------------------------------------------------------ fake encoders and data


class FakeText(TextEncoder):
    """Bytes as tokens after a BOS; an embedding and 4 tanh-linear blocks; the last block's output
    is RMS-normed like HF LLaMA, so final_is_last_layer (E_t stored once)."""

    def __init__(self, seed: int = 0, dtype: str = "float32"):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(257, WIDTH, generator=g)
        self.blocks = [torch.randn(WIDTH, WIDTH, generator=g) * 0.5 for _ in range(4)]
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.identity = EncoderIdentity("text", "fake", "fake-text", f"random:{seed}", [1, 2, 3, 4],
                                        [WIDTH] * 4, WIDTH, WIDTH, dtype, True)

    def tokenize(self, texts):
        return [[256] + list(t.encode()[:40]) for t in texts]

    def encode(self, token_ids, *, input_noise=0.0, generator=None):
        T = max(len(t) for t in token_ids)
        ids = torch.zeros(len(token_ids), T, dtype=torch.long)
        mask = torch.zeros(len(token_ids), T, dtype=torch.bool)
        for i, t in enumerate(token_ids):
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = True
        x = self.emb[ids]  # (B, T, D)
        if input_noise:
            sd = torch.stack([x[i][mask[i]].std() for i in range(len(x))])[:, None, None]
            x = x + input_noise * sd * torch.randn(x.shape, generator=generator)
        layers = []
        for w in self.blocks:
            x = torch.tanh(x @ w) + x
            layers.append(x)
        final = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        layers[-1] = final
        pooled = (final * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return EncoderOutput(layers, final, pooled, mask, final_is_last_layer=True)


class FakeTransform:
    def __call__(self, img):
        a = np.asarray(img.resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy((a - 0.5) / 0.5).permute(2, 0, 1)  # (3, 8, 8)


class FakeImage(ImageEncoder):
    """4×4 patches → 4 tokens + a class token (5 tokens); 4 blocks; LayerNorm'd final; projected mean."""

    num_tokens = 5

    def __init__(self, seed: int = 1, dtype: str = "float32"):
        g = torch.Generator().manual_seed(seed)
        self.patch = torch.randn(48, 6, generator=g) * 0.3
        self.cls = torch.randn(6, generator=g)
        self.blocks = [torch.randn(6, 6, generator=g) * 0.5 for _ in range(4)]
        self.proj = torch.randn(6, 5, generator=g)
        self.transform = FakeTransform()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.identity = EncoderIdentity("image", "fake", "fake-image", f"random:{seed}", [1, 2, 3, 4],
                                        [6] * 4, 6, 5, dtype, False)

    def encode(self, pixels, *, input_noise=0.0, generator=None):
        if input_noise:
            sd = pixels.flatten(1).std(1)[:, None, None, None]
            pixels = pixels + input_noise * sd * torch.randn(pixels.shape, generator=generator)
        B = pixels.shape[0]
        p = pixels.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(B, 4, 48)
        x = torch.cat([self.cls.expand(B, 1, 6), p @ self.patch], 1)  # (B, 5, 6)
        layers = []
        for w in self.blocks:
            x = torch.tanh(x @ w) + x
            layers.append(x)
        final = torch.nn.functional.layer_norm(x, (6,))
        return EncoderOutput(layers, final, final.mean(1) @ self.proj, torch.ones(B, 5, dtype=torch.bool))


def ref_text(enc: FakeText, ids: list[int], noise=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Float64 numpy forward of FakeText for one text: (4 layers with the normed last, pooled)."""
    x = enc.emb.double().numpy()[ids]
    out = []
    for w in enc.blocks:
        x = np.tanh(x @ w.double().numpy()) + x
        out.append(x)
    out[-1] = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
    return out, out[-1].mean(0)


def ref_image(enc: FakeImage, path: str) -> tuple[list[np.ndarray], np.ndarray]:
    a = np.asarray(Image.open(path).convert("RGB").resize((8, 8)), dtype=np.float64) / 255.0
    a = ((a - 0.5) / 0.5).transpose(2, 0, 1)
    patches = a.reshape(3, 2, 4, 2, 4).transpose(1, 3, 0, 2, 4).reshape(4, 48)
    x = np.concatenate([enc.cls.double().numpy()[None], patches @ enc.patch.double().numpy()])
    layers = []
    for w in enc.blocks:
        x = np.tanh(x @ w.double().numpy()) + x
        layers.append(x)
    final = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return layers + [final], final.mean(0) @ enc.proj.double().numpy()


WORDS = "a dog runs on the grass while two children play near an old red barn".split()


class FakeReader(DatasetReader):
    name, task, labels, splits = "fake", "single-label", ["no", "maybe", "yes"], ("train", "test")

    def __init__(self, root, *, on_bad="error", n=30, n_images=10):
        super().__init__(root, on_bad=on_bad)
        self.n, self.n_images = n, n_images

    def samples(self, split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        for i in range(self.n):
            k = int(rng.integers(self.n_images))
            text = " ".join(WORDS[: 1 + (i * 7) % len(WORDS)]) if i % 5 else "a dog"  # duplicates
            path = self.root / f"img{k}.jpg"
            yield Sample(f"{split}-{i}", split, f"img{k}", ImageRef("file", str(path)), text,
                         (i % 3,), source=f"fake.jsonl:{i + 1}")


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img{k}.jpg")
    return root


def cfg_for(out: Path, **kw) -> ExtractConfig:
    base = dict(out_dir=str(out), token_chunk_rows=16, shard_chunks=2, item_chunk_rows=4, num_workers=0,
                batch_tokens=64, image_batch_size=4, device="cpu", rank_wait_s=0)
    base.update(kw)
    return ExtractConfig(**base)


def run(root, out, reader=None, text=None, image=None, hook=None, **kw):
    return extract(cfg_for(out, **kw), progress=lambda d, t: None, reader=reader or FakeReader(root),
                   text_encoder=text or FakeText(), image_encoder=image or FakeImage(), unit_hook=hook)


def data_files(root: Path) -> dict[str, bytes]:
    """Every file of the cache except resume records."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_progress" not in p.parts}


# ------------------------------------------------------------------------------------ tests


def test_cache_holds_exact_states_dedup_and_manifest(images, tmp_path):
    out = tmp_path / "cache"
    res = run(images, out)
    assert res.complete and not res.reused
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["text"]["final_is_last_layer"] and m["perturbation"]["level"] == "none"
    root = zarr.open_group(out, mode="r")
    assert root.attrs["molt_cache"] == m
    tenc, ienc = FakeText(), FakeImage()
    reader = FakeReader(images)
    for split in ("train", "test"):
        g = root[split]
        samples = list(reader.samples(split))
        texts = sorted({s.text for s in samples})
        assert g["text/offsets"].shape[0] == len(texts) + 1  # identical texts stored once
        assert "final" not in g["text"] and "final" in g["image"]
        assert list(g["pairs/sample_id"][:]) == [s.sample_id for s in samples]
        assert list(g["pairs/target"][:]) == [s.target[0] for s in samples]
        keys = list(g["image/image_key"][:])
        assert len(keys) == len({s.image_key for s in samples})
        to, io = g["text/offsets"][:], g["image/offsets"][:]
        assert m["splits"][split]["text_tokens"] == to[-1]
        for i, s in enumerate(samples):
            k = int(g["pairs/text_index"][i])
            want, pooled = ref_text(tenc, tenc.tokenize([s.text])[0])
            for l in range(4):
                np.testing.assert_allclose(g[f"text/layer_{l}"][to[k]:to[k + 1]], want[l], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(g["text/pooled"][k], pooled, rtol=1e-5, atol=1e-5)
            j = int(g["pairs/image_index"][i])
            assert keys[j] == s.image_key
            want, pooled = ref_image(ienc, s.image.path)
            for l, name in enumerate(["layer_0", "layer_1", "layer_2", "layer_3", "final"]):
                np.testing.assert_allclose(g[f"image/{name}"][io[j]:io[j + 1]], want[l], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(g["image/pooled"][j], pooled, rtol=1e-4, atol=1e-4)
    assert res.padding_fraction <= 0.05
    again = run(images, out)
    assert again.reused and again.units_done == 0


def test_crash_then_rerun_is_byte_identical(images, tmp_path):
    clean = tmp_path / "clean"
    run(images, clean)
    crashed = tmp_path / "crashed"
    seen = []

    def crash(split, modality, unit):
        seen.append(unit)
        if len(seen) == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run(images, crashed, hook=crash)
    assert not (crashed / "manifest.json").exists()
    res = run(images, crashed)
    assert res.complete and res.units_skipped == 5 and res.units_done > 0
    assert data_files(crashed) == data_files(clean)


def test_two_ranks_equal_one(images, tmp_path):
    one = tmp_path / "one"
    run(images, one)
    two = tmp_path / "two"
    r0 = run(images, two, rank=0, world_size=2)
    assert not r0.complete and not (two / "manifest.json").exists()
    r1 = run(images, two, rank=1, world_size=2)
    assert r0.units_done > 0 and r1.units_done > 0 and not r1.complete
    done = run(images, two, rank=0, world_size=2)  # rank 0 finds every unit recorded and finishes
    assert done.complete and done.units_done == 0
    assert data_files(two) == data_files(one)


def test_refuses_a_different_cache_naming_fields(images, tmp_path):
    out = tmp_path / "cache"
    run(images, out)
    with pytest.raises(CacheMismatchError, match="text.weights_sha256"):
        run(images, out, text=FakeText(seed=5))
    partial = tmp_path / "partial"

    def crash(*a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(images, partial, hook=crash)
    with pytest.raises(CacheMismatchError, match="perturbation.noise"):
        run(images, partial, noise=0.1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(CacheMismatchError, match="not empty"):
        run(images, tmp_path / "junk")


def test_refuses_when_disk_is_short(images, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 100))
    with pytest.raises(OSError, match="not enough free disk"):
        run(images, tmp_path / "c")
    assert run(images, tmp_path / "c", force=True).complete


def test_corrupt_image_errors_or_is_recorded_then_excluded(images, tmp_path):
    (images / "img3.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DatasetError, match=r"img3\.jpg.*sample (train|test)-\d+"):
        run(images, tmp_path / "err")
    out = tmp_path / "skip"
    with pytest.raises(DatasetError, match="(?s)img3.*rerun the same command"):
        run(images, out, on_bad="skip")
    bad = json.loads((out / "bad_images.json").read_text())
    assert {r["image_key"] for r in bad} == {"img3"}
    res = run(images, out, on_bad="skip", reader=FakeReader(images, on_bad="skip"))
    assert res.complete
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"]["excluded_images"] == ["img3"]
    keys = set(zarr.open_group(out, mode="r")["train/image/image_key"][:])
    assert "img3" not in keys and len(keys) > 0


def test_missing_image_is_a_named_error_or_a_reported_skip(images, tmp_path):
    (images / "img4.jpg").unlink()
    with pytest.raises(DatasetError, match=r"img4\.jpg does not exist"):
        run(images, tmp_path / "a")
    reader = FakeReader(images, on_bad="skip")
    assert run(images, tmp_path / "b", reader=reader, on_bad="skip").complete
    assert reader.report.rows and all("img4" in r.reason for r in reader.report.rows)
    assert json.loads((tmp_path / "b" / "bad_rows.json").read_text())


def test_input_noise_does_not_depend_on_batching(images, tmp_path):
    a = run(images, tmp_path / "a", noise=0.2, seed=3)
    b = run(images, tmp_path / "b", noise=0.2, seed=3, batch_tokens=10_000, image_batch_size=1)
    clean = run(images, tmp_path / "clean")
    assert a.complete and b.complete and clean.complete
    ga, gb, gc = (zarr.open_group(tmp_path / n, mode="r")["test"] for n in ("a", "b", "clean"))
    for name in ("text/layer_3", "image/final", "text/pooled", "image/pooled"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:])
        assert np.abs(ga[name][:] - gc[name][:]).max() > 1e-3, name
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["perturbation"] == {"level": "input", "noise": 0.2, "noise_on": "both", "empty": None, "seed": 3}


def test_empty_text_and_blank_image(images, tmp_path):
    run(images, tmp_path / "t", empty="text", splits=["test"])
    g = zarr.open_group(tmp_path / "t", mode="r")
    assert list(g.group_keys()) == ["test"]
    assert g["test/text/offsets"][:].tolist() == [0, 1]  # "" → just the BOS token
    assert set(g["test/pairs/text_index"][:].tolist()) == {0}
    run(images, tmp_path / "i", empty="image", splits=["test"])
    g = zarr.open_group(tmp_path / "i", mode="r")["test"]
    assert list(g["image/image_key"][:]) == ["<blank>"]
    gray = np.full((3, 8, 8), (128 / 255 - 0.5) / 0.5, dtype=np.float32)
    want = FakeImage().encode(torch.from_numpy(gray)[None]).final[0].numpy()
    np.testing.assert_allclose(g["image/final"][:], want, rtol=1e-5, atol=1e-5)


def test_bfloat16_is_stored_as_uint16_bit_patterns(images, tmp_path):
    run(images, tmp_path / "f32", splits=["test"])
    run(images, tmp_path / "bf", splits=["test"], text=FakeText(dtype="bfloat16"), image=FakeImage(dtype="bfloat16"))
    f = zarr.open_group(tmp_path / "f32", mode="r")["test/text/layer_0"]
    b = zarr.open_group(tmp_path / "bf", mode="r")["test/text/layer_0"]
    assert b.dtype == np.uint16 and b.attrs["molt_cache_dtype"] == "bfloat16"
    as_bf16 = torch.from_numpy(b[:].view(np.int16)).view(torch.bfloat16).float()
    torch.testing.assert_close(as_bf16, torch.from_numpy(f[:]).bfloat16().float(), rtol=0, atol=0)


def test_text_batches_respect_budget_and_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 80, 600)
    items = np.arange(600)
    batches = _text_batches(items, items[5:-5], lengths, budget=512, single=False)
    assert sorted(k for b in batches for k in b) == list(range(600))
    assert all(len(b) == 1 for b in batches[:10])  # straddling items alone
    pad = sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in batches)
    assert pad <= 0.05 * lengths.sum()
    assert all(max(lengths[b]) * len(b) <= 512 for b in batches if len(b) > 1)


def test_real_tiny_encoders_on_the_bundled_sample(tmp_path):
    """tiny:llama + tiny:vit through open_dataset("sample"): text pooled = mean of E_t (float64)."""
    res = extract(ExtractConfig(dataset="sample", splits=["test"], out_dir=str(tmp_path / "c"), num_workers=0,
                                device="cpu"), progress=lambda d, t: None)
    assert res.complete
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    g = zarr.open_group(tmp_path / "c", mode="r")["test"]
    final = g["text/final"] if not m["text"]["final_is_last_layer"] else g[f"text/layer_{len(m['text']['layer_indices']) - 1}"]
    o, e_t = g["text/offsets"][:], final[:].astype(np.float64)
    want = np.stack([e_t[o[k]:o[k + 1]].mean(0) for k in range(len(o) - 1)])
    np.testing.assert_allclose(g["text/pooled"][:], want, rtol=1e-4, atol=1e-4)
    assert g["image/offsets"][-1] == g["image/layer_0"].shape[0] == m["splits"]["test"]["image_tokens"]


def test_limit_keeps_the_first_pairs_and_is_part_of_the_cache_identity(images, tmp_path):
    from molt_cache.extract import extract_config_from_manifest

    out = tmp_path / "lim"
    assert run(images, out, limit=7).complete
    g = zarr.open_group(out, mode="r")
    for split in ("train", "test"):
        first = [s.sample_id for s in FakeReader(images).samples(split)][:7]
        assert list(g[f"{split}/pairs/sample_id"][:]) == first  # reader order, before dedup
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"]["limit"] == 7 and m["splits"]["test"]["pairs"] == 7
    assert extract_config_from_manifest(m).limit == 7  # robustness rebuilds the same subset
    with pytest.raises(CacheMismatchError, match=r"dataset\.limit: cache has 7, this run wants None"):
        run(images, out)
    with pytest.raises(ValueError, match="limit must be ≥ 1"):
        run(images, tmp_path / "zero", limit=0)


def test_cli_progress_shows_items_per_modality_with_rate_and_eta(images, tmp_path):
    """The library reports through callbacks; the CLI's bars render them (on a terminal)."""
    import io

    from rich.console import Console

    from cli.progress import ExtractBars

    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=True, color_system=None)
    with ExtractBars(console) as bars:
        res = extract(cfg_for(tmp_path / "c", splits=["test"]), reader=FakeReader(images),
                      text_encoder=FakeText(), image_encoder=FakeImage(), **bars.callbacks())
    assert res.complete
    text = buf.getvalue()
    n_texts = len({s.text for s in FakeReader(images).samples("test")})
    n_images = len({s.image_key for s in FakeReader(images).samples("test")})
    assert "images" in text and f"{n_images}/{n_images}" in text and "images/s" in text
    assert f"{n_texts}/{n_texts}" in text and "texts/s" in text and "eta" in text
    assert text.index("images") < text.index("texts")  # images run first


def test_library_prints_nothing_and_reports_through_callbacks(images, tmp_path, capsys):
    events: list[tuple] = []
    res = extract(cfg_for(tmp_path / "c", splits=["test"]), reader=FakeReader(images),
                  text_encoder=FakeText(), image_encoder=FakeImage(),
                  on_log=lambda line: events.append(("log", line)),
                  on_phase=lambda m, n: events.append(("phase", m, n)),
                  on_items=lambda m, n: events.append(("items", m, n)))
    assert res.complete
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    n_texts = len({s.text for s in FakeReader(images).samples("test")})
    n_images = len({s.image_key for s in FakeReader(images).samples("test")})
    phases = [e for e in events if e[0] == "phase"]
    assert phases == [("phase", "image", n_images), ("phase", "text", n_texts)]
    assert sum(e[2] for e in events if e[:2] == ("items", "image")) == n_images
    assert sum(e[2] for e in events if e[:2] == ("items", "text")) == n_texts
    assert any(e[0] == "log" and "manifest.json written" in e[1] for e in events)


def test_cli_progress_off_a_terminal_prints_plain_lines_without_carriage_returns(images, tmp_path):
    import io

    from rich.console import Console

    from cli.progress import ExtractBars

    buf = io.StringIO()
    with ExtractBars(Console(file=buf, width=80, force_terminal=False)) as bars:
        extract(cfg_for(tmp_path / "c", splits=["test"]), reader=FakeReader(images),
                text_encoder=FakeText(), image_encoder=FakeImage(), **bars.callbacks())
    text = buf.getvalue()
    n_images = len({s.image_key for s in FakeReader(images).samples("test")})
    assert "\r" not in text and "\x1b" not in text
    assert f"images: {n_images}/{n_images} encoded" in text and "texts: " in text


@pytest.mark.parametrize("args, path", [
    (["--text", "hf:/no/such/dir"], "/no/such/dir"),
    (["--image", "open_clip:ViT-B-32", "--image-weights", "/no/such.bin"], "/no/such.bin"),
    (["--image", "timm:resnet18", "--image-weights", "/no/such.pth"], "/no/such.pth"),
    (["--dataset", "snli-ve", "--root", "{empty}"], "snli_ve_train.jsonl"),
    (["--dataset", "snli-ve", "--root", "{empty}/missing"], "{empty}/missing"),
    (["--dataset", "food101", "--root", "{empty}"], "texts/train_titles.csv"),
])
def test_cli_names_a_missing_path_with_exit_code_2(args, path, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(empty=empty) for a in args]
    base = {"--text": "tiny:llama", "--image": "tiny:vit"}
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    result = CliRunner().invoke(app, ["extract", "--split", "test", "--device", "cpu", "--num-workers", "0",
                                      "--out-dir", str(tmp_path / "out"), *args])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2, flat[-1500:]
    assert "error:" in flat and path.format(empty=empty) in flat
    assert "Traceback" not in flat and not (tmp_path / "out" / "manifest.json").exists()
