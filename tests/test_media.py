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
from mmcompose.testing import assert_float_close, float_tol

F32 = np.float32
# Log-mel outputs compared across two runs of Whisper's float32 pipeline: mel energies are sums
# of 201 positive terms (relative rounding), seen through log10(.) / 4, plus one rounding of
# the log values themselves (|log10 E| <= 10, so outputs up to 2.5).
LOG_MEL_TOL = float_tol(torch.float32, 1.0, n_terms=201) / (4 * np.log(10)) + float_tol(
    torch.float32, 2.5
)

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
    assert np.all(
        np.abs(arr[:, 2].astype(int) - 127) <= 1
    )  # 255 * 127/255: uint8 rounds either way


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
    # uint8 rounding (1/255) and the bicubic filter's overshoot near the stripe edges; a wrong
    # crop or channel order shows a red or blue stripe instead (error O(1))
    assert torch.allclose(rgb[:, :, 2:8], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1), atol=0.02)
    gray = media.image_to_tensor(np.full((7, 9, 3), 100, np.uint8), 4, (0.5, 0.5, 0.5), (0.25,) * 3)
    # a constant image stays constant; (x - 0.5) / 0.25 in float32, terms up to 0.5 / 0.25
    assert_float_close(gray, torch.full((3, 4, 4), (100 / 255 - 0.5) / 0.25), magnitude=2.0)


def test_sample_frames_to_tensor_matches_per_frame() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    out = media.sample_frames_to_tensor(frames, 8, media.CLIP_MEAN, media.CLIP_STD)
    assert out.shape == (3, 3, 8, 8)
    for t in range(3):
        ref = media.image_to_tensor(frames[t], 8, media.CLIP_MEAN, media.CLIP_STD)
        assert torch.equal(out[t], ref)  # the same per-frame call on the same frame: exact


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
    assert _peak_hz(wave, 16000) == pytest.approx(440, abs=1)  # FFT bins are 16000/16000 Hz
    middle = wave[2000:-2000]  # away from the resampler's edge transients
    # mean of 0.5 and 0.3; the resampler's passband ripple and 16-bit PCM, not float rounding
    assert np.abs(middle).max() == pytest.approx(0.4, abs=0.01)
    short = media.load_audio(path, sample_rate=16000, max_seconds=0.25)
    assert short.shape == (4000,)
    # the resampler sees a shorter input: its filter tails differ slightly (signal 0.4)
    np.testing.assert_allclose(short[:3000], wave[:3000], atol=0.02)


def test_flac_8k_is_upsampled(tmp_path: Path) -> None:
    path = tmp_path / "s.flac"
    sf.write(path, _sine(440, 8000, 0.5, 0.8), 8000)
    wave = media.load_audio(path)
    assert wave.shape == (8000,)
    assert _peak_hz(wave, 16000) == pytest.approx(440, abs=2)  # FFT bins are 16000/8000 Hz
    assert np.abs(wave[1000:-1000]).max() == pytest.approx(0.8, abs=0.01)  # resampler ripple


def test_prepare_waveform_int_pcm_and_channels_first() -> None:
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    # int16 / 32768 is exact in float32
    np.testing.assert_array_equal(media.prepare_waveform(pcm, 16000), [0, 0.5, -1, 32767 / 32768])
    chans_first = torch.tensor(np.stack([_sine(440, 16000, 0.1, 0.6), np.zeros(1600)]))
    mono = media.prepare_waveform(chans_first, 16000)
    # sample 300 falls on the crest (440/16000 = 11/400); a float32 mean of 2 channels
    peak = np.abs(mono).max()
    assert mono.shape == (1600,) and peak == pytest.approx(0.3, abs=float_tol(F32, 0.6, 2))
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
    # the same float32 torch pipeline (stft, mel matmul, log10); only rounding may differ
    assert np.abs(ours.numpy() - ref).max() < LOG_MEL_TOL


def test_mel_filter_bank_matches_whisper(whisper_fe) -> None:
    # float64 formulas: (edge - f) / width with Hz values up to 8 kHz over widths of about one
    # 40 Hz bin, at the filters' size (<= 0.026)
    ref = whisper_fe.mel_filters.T
    mag = np.abs(ref).max() * 8000 / 40
    np.testing.assert_allclose(
        media.mel_filter_bank(80, 400, 16000), ref, atol=float_tol(np.float64, mag), rtol=0
    )


def test_log_mel_frame_counts() -> None:
    wave = _harmonics(2.0)
    assert media.log_mel_spectrogram(wave, n_frames=None).shape == (80, 200)
    short = media.log_mel_spectrogram(wave, n_frames=50, n_mels=40)
    assert short.shape == (40, 50)
    full = media.log_mel_spectrogram(wave, n_frames=None, n_mels=40)
    # a prefix of the frames (up to rounding), floored at max - 8 in log10 (2 after / 4)
    assert short.max() <= full.max() + LOG_MEL_TOL
    assert float(short.min()) >= float(short.max()) - 2.0 - LOG_MEL_TOL


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
    """Frame index from its gray level: the lossy codec's error (a few levels) is below half
    a step (6 levels), so rounding recovers the index."""
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
    # load_video looks the estimate up in its own module, so that is where it is patched.
    monkeypatch.setattr(media.video, "_video_frame_estimate", lambda p: 7)  # metadata that lies
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


def _write_frames(folder: Path, n: int, ext: str = "png", name: str = "frame_{}") -> Path:
    """Frame i as a file named with its unpadded index (frame_2 sorts before frame_10 only
    if numbers compare as numbers), gray level GRAY_STEP * i like _write_video's frames."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((48, 64, 3), GRAY_STEP * i, np.uint8)).save(
            folder / f"{name.format(i)}.{ext}"
        )
    return folder


@pytest.mark.parametrize(("n", "num_frames"), [(20, 5), (20, 8), (3, 8), (1, 4)])
def test_frame_folder_samples_as_the_same_clip_as_a_video_file(tmp_path, n, num_frames):
    folder = _write_frames(tmp_path / "frames", n)
    (folder / "notes.txt").write_text("not a frame\n")  # other files are not frames
    (folder / ".thumb.png").write_bytes(b"hidden, and not even an image")
    video = tmp_path / "clip.mp4"
    _write_video(video, n)
    frames = media.load_video(folder, num_frames=num_frames)
    assert frames.shape == (num_frames, 48, 64, 3) and frames.dtype == np.uint8
    # the same count and the same frames as the video file of that clip
    assert _indices(frames) == _indices(media.load_video(video, num_frames=num_frames))
    assert _indices(frames) == media._frame_indices(n, num_frames).tolist()


def test_frame_folder_order_is_by_name_with_numbers_as_numbers(tmp_path):
    folder = _write_frames(tmp_path / "f", 12, ext="jpg", name="img{}")
    assert [f.name for f in media.frame_files(folder)][:4] == [f"img{i}.jpg" for i in range(4)]
    assert [f.name for f in media.frame_files(folder)][-2:] == ["img10.jpg", "img11.jpg"]
    assert _indices(media.load_video(folder, num_frames=4)) == [1, 4, 7, 10]


def test_frame_folder_resizes_odd_frames_to_the_first(tmp_path):
    folder = _write_frames(tmp_path / "f", 4)
    Image.fromarray(np.full((24, 32, 3), GRAY_STEP * 3, np.uint8)).save(folder / "frame_3.png")
    frames = media.load_video(folder, num_frames=4)
    assert frames.shape == (4, 48, 64, 3) and _indices(frames) == [0, 1, 2, 3]


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_still_image_is_a_one_frame_video(tmp_path, ext):
    rng = np.random.default_rng(0)
    path = tmp_path / f"still.{ext}"
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    frames = media.load_video(path, num_frames=6)
    assert frames.shape == (6, 30, 40, 3) and frames.dtype == np.uint8
    image = np.asarray(media.load_image(path))
    assert all(np.array_equal(f, image) for f in frames)  # the same decoded pixels, repeated
    one = tmp_path / "one.mp4"
    _write_video(one, 1)  # a one-frame video file samples to the same count: frame 0 each time
    assert media.load_video(one, num_frames=6).shape[0] == 6


def test_empty_frame_folder_fails_with_its_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _raises_naming(empty, "no frame images", media.load_video)
    assert ".jpg" in (err.hint or "")
    (empty / "readme.txt").write_text("frames went missing\n")
    _raises_naming(empty, "no frame images", media.load_video)


@pytest.mark.parametrize("num_frames", [1, 5])  # with 1 frame, frame 7 is not even sampled
def test_unreadable_frame_fails_naming_the_folder_and_the_frame(tmp_path, num_frames):
    folder = _write_frames(tmp_path / "f", 20)
    (folder / "frame_7.png").write_text("this is not a png\n")
    err = _raises_naming(folder, "unreadable frame in video folder", media.load_video, num_frames)
    assert str(folder / "frame_7.png") in err.message and "cannot decode" in err.message
    (folder / "frame_7.png").write_bytes(b"")
    err = _raises_naming(folder, "unreadable frame", media.load_video, num_frames)
    assert "empty" in err.message


def test_truncated_sampled_frame_fails(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
    whole = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(whole[: len(whole) * 3 // 4])
    err = _raises_naming(folder, "unreadable frame", media.load_video, 3)
    assert str(folder / "1.png") in err.message


def test_video_encoder_takes_every_form(tmp_path, media_files):
    """Through the processor: a video file, a frame folder and a still image give the same
    tensor shape; in memory, one image or frames of any count are sampled the same way."""
    from mmcompose.testing import build_tiny_model

    _, proc = build_tiny_model(("video",), strategy="shared")
    folder = _write_frames(tmp_path / "frames", 7)
    still = tmp_path / "still.jpg"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(still)
    batch = proc.preprocess("video", [str(media_files["video"]), str(folder), str(still)])
    t = batch.shape[1]
    assert batch.shape[0] == 3 and batch.ndim == 5
    assert torch.equal(batch[2], batch[2][:1].expand_as(batch[2]))  # a still: one frame, repeated
    frames = media.load_video(folder, num_frames=t)
    direct = proc.preprocess("video", [frames])
    assert torch.equal(direct[0], batch[1])  # the loaded frames, not another sampling
    longer = proc.preprocess("video", [np.stack([frames[0]] * (t + 3))])
    assert longer.shape == direct.shape
    assert torch.equal(proc.preprocess("video", [media.load_image(still)])[0], batch[2])


# --------------------------------------------------------------------------- point clouds


def test_npy_and_npz_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xyz = rng.standard_normal((50, 3))
    np.save(tmp_path / "p.npy", xyz)
    out = media.load_point_cloud(tmp_path / "p.npy")
    # float64 file values rounded once to float32
    assert out.dtype == np.float32 and np.allclose(out, xyz, atol=float_tol(F32, np.abs(xyz).max()))
    colored = np.hstack([xyz, rng.integers(0, 256, (50, 3))])  # 0-255 colours
    np.savez(tmp_path / "p.npz", points=colored, other=np.zeros(3))
    out6 = media.load_point_cloud(tmp_path / "p.npz")
    assert out6.shape == (50, 6)
    np.testing.assert_allclose(out6[:, 3:], colored[:, 3:] / 255, atol=float_tol(F32, 1.0))


def test_ply_point_cloud_with_colors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    xyz = rng.random((30, 3))
    rgba = rng.integers(0, 256, (30, 4), dtype=np.uint8)
    trimesh.PointCloud(xyz, colors=rgba).export(tmp_path / "pc.ply")
    out = media.load_point_cloud(tmp_path / "pc.ply")
    assert out.shape == (30, 6)
    np.testing.assert_allclose(out[:, :3], xyz, atol=float_tol(F32, 1.0))  # float32 of [0, 1)
    np.testing.assert_allclose(out[:, 3:], rgba[:, :3] / 255, atol=float_tol(F32, 1.0))


@pytest.mark.parametrize("ext", ["off", "stl", "ply"])
def test_box_mesh_is_sampled_on_its_surface(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"box.{ext}"
    trimesh.creation.box(extents=(1.0, 1.0, 2.0)).export(path)
    pts = media.load_point_cloud(path, num_samples=6000, seed=3)
    assert pts.shape == (6000, 3)
    half = np.array([0.5, 0.5, 1.0])
    tol = float_tol(F32, 1.0, n_terms=3)  # barycentric sums of 3 vertices, then float32
    assert np.allclose(np.abs(pts / half).max(axis=1), 1.0, atol=tol)  # on a face
    on_caps = np.isclose(np.abs(pts[:, 2]), 1.0, atol=tol).mean()
    # caps are 2 of 10 area units; 0.02 is 3.9 binomial sd for 6000 samples
    assert on_caps == pytest.approx(2 / 10, abs=0.02)
    assert np.array_equal(pts, media.load_point_cloud(path, num_samples=6000, seed=3))
    assert not np.array_equal(pts, media.load_point_cloud(path, num_samples=6000, seed=4))


def test_obj_icosphere_and_vertex_colors(tmp_path: Path) -> None:
    trimesh.creation.icosphere(subdivisions=2, radius=1.0).export(tmp_path / "s.obj")
    pts = media.load_point_cloud(tmp_path / "s.obj", num_samples=500)
    radii = np.linalg.norm(pts, axis=1)
    # on flat faces inside the unit sphere (up to float32 rounding), none far inside it
    tol = float_tol(F32, 1.0, n_terms=3)
    assert pts.shape == (500, 3) and radii.max() <= 1 + tol and radii.min() > 0.95
    mesh = trimesh.creation.box()
    mesh.visual.vertex_colors = np.tile([255, 0, 51, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    colored = media.sample_points(mesh, 100, seed=0)
    assert colored.shape == (100, 6)
    expected = np.tile([1.0, 0.0, 0.2], (100, 1))  # 51 / 255, rounded to float32
    np.testing.assert_allclose(colored[:, 3:], expected, atol=float_tol(F32, 1.0))


def test_normalize_points_subsamples_deterministically() -> None:
    rng = np.random.default_rng(0)
    pts = np.hstack([rng.standard_normal((100, 3)) * 5 + 10, rng.random((100, 3))])
    a = media.normalize_points(pts, 40, seed=7)
    assert a.shape == (40, 6) and a.dtype == torch.float32
    assert torch.equal(a, media.normalize_points(pts, 40, seed=7))
    assert not torch.equal(a, media.normalize_points(pts, 40, seed=8))
    assert torch.unique(a, dim=0).shape[0] == 40  # without replacement
    full = media.normalize_points(pts, 100, seed=0).numpy().astype(np.float64)
    # float32 rounding of centred, scaled coordinates (inputs up to |x| / radius), 100 terms
    xyz = pts[:, :3]
    mag = np.abs(xyz).max() / np.linalg.norm(xyz - xyz.mean(axis=0), axis=1).max()
    assert np.allclose(full[:, :3].mean(axis=0), 0, atol=float_tol(F32, mag, n_terms=100))
    radius = np.linalg.norm(full[:, :3], axis=1).max()
    assert radius == pytest.approx(1.0, abs=float_tol(F32, 1.0, n_terms=3))  # a float32 3-vector
    # colour channels are carried through untouched (one float32 rounding of values < 1)
    gap = np.abs(a.numpy()[:, None, 3:] - pts[None, :, 3:]).max(axis=2).min(axis=1)
    assert gap.max() < float_tol(F32, 1.0)


def test_normalize_points_pads_when_fewer() -> None:
    pts = np.array([[0, 0, 0], [2, 0, 0], [0, 2, 0]], np.float32)
    out = media.normalize_points(pts, 10, seed=1).numpy()
    assert out.shape == (10, 3)
    expected = (pts - pts.mean(axis=0)) / np.linalg.norm(pts - pts.mean(axis=0), axis=1).max()
    tol = float_tol(F32, 1.0, n_terms=3)  # float32 centring and scaling of 3-vectors <= 1
    np.testing.assert_allclose(out[:3], expected, atol=tol)  # every original point kept
    assert all(any(np.allclose(row, e, atol=tol) for e in expected) for row in out)


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
