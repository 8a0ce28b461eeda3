"""Tests for mmcompose.model.media: real files written to tmp_path, decoded back, and checked
for content (not just shapes) so a loader that returns the wrong pixels/samples/frames fails."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import trimesh
from PIL import Image

from mmcompose.errors import MediaError
from mmcompose.model import media

# --------------------------------------------------------------------------- images


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 1] = (0, 0, 255, 255)  # opaque blue stays blue
    rgba[:, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    img = media.load_image(path)
    assert img.mode == "RGB" and img.size == (3, 2)
    arr = np.asarray(img)
    assert (arr[:, 0] == 255).all()
    assert (arr[:, 1] == (0, 0, 255)).all()
    assert np.all(np.abs(arr[:, 2].astype(int) - 127) <= 1)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    arr = np.asarray(media.load_image(path))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [200, 100, 50]


def test_grayscale_and_16bit_png(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 77]], np.uint8), mode="L").save(tmp_path / "g.png")
    assert np.asarray(media.load_image(tmp_path / "g.png")).tolist() == [[[0] * 3, [77] * 3]]
    Image.fromarray(np.array([[65535, 32896]], np.uint16)).save(tmp_path / "g16.png")
    arr = np.asarray(media.load_image(tmp_path / "g16.png"))
    assert arr[0, :, 0].tolist() == [255, 128]


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    arr = np.asarray(media.load_image(path)).astype(int)
    assert arr.shape == (40, 20, 3)
    assert arr[2, 10, 0] > 200 and arr[2, 10, 2] < 60  # top is the former left: red
    assert arr[37, 10, 2] > 200 and arr[37, 10, 0] < 60  # bottom: blue


def test_image_to_tensor_resizes_shorter_side_and_center_crops() -> None:
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20] = (255, 0, 0)
    stripes[:, 20:40] = (0, 255, 0)
    stripes[:, 40:] = (0, 0, 255)
    x = media.image_to_tensor(Image.fromarray(stripes), 10, media.IMAGENET_MEAN, media.IMAGENET_STD)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    mean = torch.tensor(media.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(media.IMAGENET_STD).view(3, 1, 1)
    rgb = x * std + mean  # the centre crop of a 30x10 resize is the green stripe only
    assert torch.allclose(rgb[:, :, 2:8], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=0.02)
    gray = media.image_to_tensor(np.full((7, 9, 3), 100, np.uint8), 4, (0.5, 0.5, 0.5), (0.25,) * 3)
    assert torch.allclose(gray, torch.full((3, 4, 4), (100 / 255 - 0.5) / 0.25), atol=1e-5)


def test_sample_frames_to_tensor_matches_per_frame() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    out = media.sample_frames_to_tensor(frames, 8, media.CLIP_MEAN, media.CLIP_STD)
    assert out.shape == (3, 3, 8, 8)
    for t in range(3):
        ref = media.image_to_tensor(frames[t], 8, media.CLIP_MEAN, media.CLIP_STD)
        assert torch.equal(out[t], ref)


# --------------------------------------------------------------------------- audio


def _sine(freq: float, sr: int, seconds: float, amp: float) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)


def _peak_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / sr)[spectrum.argmax()])


def test_wav_44k_stereo_is_downmixed_and_resampled(tmp_path: Path) -> None:
    path = tmp_path / "s.wav"
    stereo = np.stack([_sine(440, 44100, 1.0, 0.5), _sine(440, 44100, 1.0, 0.3)], axis=1)
    sf.write(path, stereo, 44100, subtype="PCM_16")
    wave = media.load_audio(path, sample_rate=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape == (16000,)  # ceil(44100 * 160 / 441)
    assert np.abs(wave).max() <= 1.0
    assert _peak_hz(wave, 16000) == pytest.approx(440, abs=1)
    middle = wave[2000:-2000]  # away from the resampler's edge transients
    assert np.abs(middle).max() == pytest.approx(0.4, abs=0.01)  # mean of 0.5 and 0.3
    short = media.load_audio(path, sample_rate=16000, max_seconds=0.25)
    assert short.shape == (4000,)
    np.testing.assert_allclose(short[:3000], wave[:3000], atol=0.02)


def test_flac_8k_is_upsampled(tmp_path: Path) -> None:
    path = tmp_path / "s.flac"
    sf.write(path, _sine(440, 8000, 0.5, 0.8), 8000)
    wave = media.load_audio(path)
    assert wave.shape == (8000,)
    assert _peak_hz(wave, 16000) == pytest.approx(440, abs=2)
    assert np.abs(wave[1000:-1000]).max() == pytest.approx(0.8, abs=0.01)


def test_prepare_waveform_int_pcm_and_channels_first() -> None:
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    np.testing.assert_allclose(media.prepare_waveform(pcm, 16000), [0, 0.5, -1, 32767 / 32768])
    chans_first = torch.tensor(np.stack([_sine(440, 16000, 0.1, 0.6), np.zeros(1600)]))
    mono = media.prepare_waveform(chans_first, 16000)
    assert mono.shape == (1600,) and np.abs(mono).max() == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(MediaError):
        media.prepare_waveform(np.zeros(0, np.float32), 16000)


# --------------------------------------------------------------------------- log-mel


@pytest.fixture(scope="module")
def whisper_fe():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor()


def _chirp_plus_noise(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(0)
    sweep = 0.5 * np.sin(2 * np.pi * (100 * t + 600 * t**2))  # 100 Hz -> ~6 kHz
    return (sweep + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _harmonics(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    phase = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 3 * t)) / 16000  # vibrato f0
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)) ** 2  # syllable-like bursts
    return (0.2 * voiced * envelope).astype(np.float32)


@pytest.mark.parametrize(
    "wave",
    [_chirp_plus_noise(5.0), _harmonics(12.0), _chirp_plus_noise(33.0)],  # last one is trimmed
    ids=["chirp_noise", "harmonics", "longer_than_30s"],
)
def test_log_mel_matches_whisper_feature_extractor(whisper_fe, wave: np.ndarray) -> None:
    ref = whisper_fe(wave, sampling_rate=16000, return_tensors="np").input_features[0]
    ours = media.log_mel_spectrogram(wave)
    assert ours.shape == (80, 3000) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - ref).max() < 1e-4


def test_mel_filter_bank_matches_whisper(whisper_fe) -> None:
    np.testing.assert_allclose(
        media.mel_filter_bank(80, 400, 16000), whisper_fe.mel_filters.T, atol=1e-9
    )


def test_log_mel_frame_counts() -> None:
    wave = _harmonics(2.0)
    assert media.log_mel_spectrogram(wave, n_frames=None).shape == (80, 200)
    short = media.log_mel_spectrogram(wave, n_frames=50, n_mels=40)
    assert short.shape == (40, 50)
    full = media.log_mel_spectrogram(wave, n_frames=None, n_mels=40)
    assert short.max() <= full.max() + 1e-6 and float(short.min()) >= float(short.max()) - 2.0


# --------------------------------------------------------------------------- video

GRAY_STEP = 12  # frame i is a uniform gray of level 12 * i, so decoded frames reveal their index


def _write_video(path: Path, n: int, codec: str = "mpeg4") -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            rgb = np.full((48, 64, 3), GRAY_STEP * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _indices(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / GRAY_STEP) for f in frames]


@pytest.mark.parametrize("ext", ["mp4", "mkv", "avi"])  # mkv has no frame count in its header
def test_video_uniform_sampling_in_order(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"clip.{ext}"
    _write_video(path, 20)
    frames = media.load_video(path, num_frames=5)
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    assert _indices(frames) == [2, 6, 10, 14, 18]


def test_video_with_wrong_header_count_is_resampled(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "clip.mp4"
    _write_video(path, 20)
    monkeypatch.setattr(media, "_video_frame_estimate", lambda p: 7)  # metadata that lies
    assert _indices(media.load_video(path, num_frames=5)) == [2, 6, 10, 14, 18]


def test_short_video_repeats_frames(tmp_path: Path) -> None:
    path = tmp_path / "short.mp4"
    _write_video(path, 3)
    assert _indices(media.load_video(path, num_frames=8)) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_gif_video(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.fromarray(np.full((8, 8), GRAY_STEP * i, np.uint8), mode="L") for i in range(6)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = media.load_video(path, num_frames=3)
    assert out.shape == (3, 8, 8, 3)
    assert _indices(out) == [1, 3, 5]


# --------------------------------------------------------------------------- point clouds


def test_npy_and_npz_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xyz = rng.standard_normal((50, 3))
    np.save(tmp_path / "p.npy", xyz)
    out = media.load_point_cloud(tmp_path / "p.npy")
    assert out.dtype == np.float32 and np.allclose(out, xyz, atol=1e-6)
    colored = np.hstack([xyz, rng.integers(0, 256, (50, 3))])  # 0-255 colours
    np.savez(tmp_path / "p.npz", points=colored, other=np.zeros(3))
    out6 = media.load_point_cloud(tmp_path / "p.npz")
    assert out6.shape == (50, 6)
    np.testing.assert_allclose(out6[:, 3:], colored[:, 3:] / 255, atol=1e-6)


def test_ply_point_cloud_with_colors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    xyz = rng.random((30, 3))
    rgba = rng.integers(0, 256, (30, 4), dtype=np.uint8)
    trimesh.PointCloud(xyz, colors=rgba).export(tmp_path / "pc.ply")
    out = media.load_point_cloud(tmp_path / "pc.ply")
    assert out.shape == (30, 6)
    np.testing.assert_allclose(out[:, :3], xyz, atol=1e-6)
    np.testing.assert_allclose(out[:, 3:], rgba[:, :3] / 255, atol=1e-6)


@pytest.mark.parametrize("ext", ["off", "stl", "ply"])
def test_box_mesh_is_sampled_on_its_surface(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"box.{ext}"
    trimesh.creation.box(extents=(1.0, 1.0, 2.0)).export(path)
    pts = media.load_point_cloud(path, num_samples=6000, seed=3)
    assert pts.shape == (6000, 3)
    half = np.array([0.5, 0.5, 1.0])
    assert np.allclose(np.abs(pts / half).max(axis=1), 1.0, atol=1e-5)  # on a face
    on_caps = np.isclose(np.abs(pts[:, 2]), 1.0, atol=1e-5).mean()
    assert on_caps == pytest.approx(2 / 10, abs=0.02)  # caps are 2 of 10 area units
    assert np.array_equal(pts, media.load_point_cloud(path, num_samples=6000, seed=3))
    assert not np.array_equal(pts, media.load_point_cloud(path, num_samples=6000, seed=4))


def test_obj_icosphere_and_vertex_colors(tmp_path: Path) -> None:
    trimesh.creation.icosphere(subdivisions=2, radius=1.0).export(tmp_path / "s.obj")
    pts = media.load_point_cloud(tmp_path / "s.obj", num_samples=500)
    radii = np.linalg.norm(pts, axis=1)
    assert pts.shape == (500, 3) and radii.max() <= 1 + 1e-5 and radii.min() > 0.95
    mesh = trimesh.creation.box()
    mesh.visual.vertex_colors = np.tile([255, 0, 51, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    colored = media.sample_points(mesh, 100, seed=0)
    assert colored.shape == (100, 6)
    np.testing.assert_allclose(colored[:, 3:], np.tile([1.0, 0.0, 0.2], (100, 1)), atol=1e-6)


def test_normalize_points_subsamples_deterministically() -> None:
    rng = np.random.default_rng(0)
    pts = np.hstack([rng.standard_normal((100, 3)) * 5 + 10, rng.random((100, 3))])
    a = media.normalize_points(pts, 40, seed=7)
    assert a.shape == (40, 6) and a.dtype == torch.float32
    assert torch.equal(a, media.normalize_points(pts, 40, seed=7))
    assert not torch.equal(a, media.normalize_points(pts, 40, seed=8))
    assert torch.unique(a, dim=0).shape[0] == 40  # without replacement
    full = media.normalize_points(pts, 100, seed=0).numpy().astype(np.float64)
    assert np.allclose(full[:, :3].mean(axis=0), 0, atol=1e-5)
    assert np.linalg.norm(full[:, :3], axis=1).max() == pytest.approx(1.0, abs=1e-6)
    # colour channels are carried through untouched
    gap = np.abs(a.numpy()[:, None, 3:] - pts[None, :, 3:]).max(axis=2).min(axis=1)
    assert gap.max() < 1e-6


def test_normalize_points_pads_when_fewer() -> None:
    pts = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0]], np.float32)
    out = media.normalize_points(pts, 10, seed=1).numpy()
    assert out.shape == (10, 3)
    expected = (pts - pts.mean(axis=0)) / np.linalg.norm(pts - pts.mean(axis=0), axis=1).max()
    np.testing.assert_allclose(out[:3], expected, atol=1e-6)  # every original point kept
    assert all(any(np.allclose(row, e, atol=1e-6) for e in expected) for row in out)


# --------------------------------------------------------------------------- bad inputs


def _raises_naming(path: Path, match: str, fn, *args) -> MediaError:
    with pytest.raises(MediaError, match=match) as info:
        fn(path, *args)
    assert str(path) in info.value.message
    return info.value


def test_missing_files(tmp_path: Path) -> None:
    for fn, name in [
        (media.load_image, "x.png"),
        (media.load_audio, "x.wav"),
        (media.load_video, "x.mp4"),
        (media.load_point_cloud, "x.npy"),
    ]:
        err = _raises_naming(tmp_path / name, "not found", fn)
        assert err.hint


def test_text_file_named_png_or_mp4_or_ply(tmp_path: Path) -> None:
    for name, fn in [
        ("fake.png", media.load_image),
        ("fake.mp4", media.load_video),
        ("fake.ply", media.load_point_cloud),
        ("fake.wav", media.load_audio),
    ]:
        path = tmp_path / name
        path.write_text("this is not media\n")
        _raises_naming(path, "cannot decode", fn)


def test_truncated_wav(tmp_path: Path) -> None:
    whole = tmp_path / "whole.wav"
    sf.write(whole, _sine(440, 16000, 1.0, 0.5), 16000)
    data = whole.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    _raises_naming(cut, "truncated", media.load_audio)
    header_only = tmp_path / "head.wav"
    header_only.write_bytes(data[:20])
    _raises_naming(header_only, "cannot decode", media.load_audio)


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "notes.xyz"
    path.write_text("1 2 3\n")
    for fn, supported in [
        (media.load_image, ".png"),
        (media.load_audio, ".flac"),
        (media.load_video, ".mkv"),
        (media.load_point_cloud, ".npz"),
    ]:
        err = _raises_naming(path, "unsupported", fn)
        assert supported in (err.hint or "")


def test_empty_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "none.npy", np.zeros((0, 3), np.float32))
    _raises_naming(tmp_path / "none.npy", "no points", media.load_point_cloud)
    (tmp_path / "zero.ply").write_bytes(b"")
    _raises_naming(tmp_path / "zero.ply", "empty", media.load_point_cloud)
    np.save(tmp_path / "bad.npy", np.zeros((5, 4), np.float32))
    _raises_naming(tmp_path / "bad.npy", "shape", media.load_point_cloud)
    sf.write(tmp_path / "silent.wav", np.zeros(0, np.float32), 16000)
    _raises_naming(tmp_path / "silent.wav", "no samples", media.load_audio)


# --------------------------------------------------------------------------- cut-short files
def test_truncated_png_wav_and_ply(tmp_path: Path) -> None:
    """An interrupted download fails with the path; it never decodes to something shorter."""
    png, wav, ply = tmp_path / "a.png", tmp_path / "a.wav", tmp_path / "a.ply"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(png)
    sf.write(wav, _sine(440, 16000, 0.5, 0.5), 16000)
    trimesh.creation.icosphere(subdivisions=2).export(ply)
    for path, fn, needle in [
        (png, media.load_image, "truncated"),
        (wav, media.load_audio, "truncated"),
        (ply, media.load_point_cloud, "cannot decode"),
    ]:
        cut = tmp_path / f"cut{path.suffix}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
        _raises_naming(cut, needle, fn)


def test_truncated_off_mesh_is_caught_by_its_header_counts(tmp_path: Path) -> None:
    whole = tmp_path / "m.off"
    trimesh.creation.icosphere(subdivisions=2).export(whole)
    assert media.load_point_cloud(whole, num_samples=16).shape == (16, 3)
    cut = tmp_path / "cut.off"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 9 // 10])  # whole lines lost
    err = _raises_naming(cut, "truncated", media.load_point_cloud)
    assert "declares 162 vertices and 320 faces" in err.message


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_truncated_video_fails_instead_of_sampling_fewer_frames(tmp_path: Path, ext: str) -> None:
    import av.logging

    path = tmp_path / f"clip.{ext}"
    opts = {"movflags": "faststart"} if ext == "mp4" else {}  # index first: frames still decode
    with av.open(str(path), "w", options=opts) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            rgb = np.full((48, 64, 3), GRAY_STEP * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert _indices(media.load_video(path, num_frames=5)) == [2, 6, 10, 14, 18]
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 9 // 10])
    _raises_naming(cut, "truncated", media.load_video)
    assert av.logging.get_level() is None  # FFmpeg's log level is left as it was


def test_on_corrupt_policy() -> None:
    err = MediaError("cannot decode image file x.png: broken", hint="re-export it")
    skipped: dict[str, str] = {}
    with pytest.raises(MediaError) as info:
        media.handle_unreadable("x.png", err, "fail", skipped)
    assert info.value.message == err.message and "on_corrupt: skip" in (info.value.hint or "")
    media.handle_unreadable("x.png", err, "skip", skipped)
    media.handle_unreadable("y.npy", MediaError("point cloud has NaN"), "skip", skipped)
    assert skipped == {"x.png": err.message, "y.npy": "y.npy: point cloud has NaN"}
    with pytest.warns(media.CorruptFileWarning) as caught:
        media.warn_skipped(skipped, "ctx")
    text = str(caught[0].message)
    assert text.startswith("ctx: skipped 2 unreadable file(s)") and "y.npy" in text
    with pytest.raises(ValueError, match="on_corrupt"):
        media.handle_unreadable("x.png", err, "ignore", skipped)  # type: ignore[arg-type]
