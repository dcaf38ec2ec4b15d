"""The int8 graphs compute the same numbers on every x86-64 CPU.

onnxruntime's default u8 x s8 kernels on AVX2 (and AVX-512 without VNNI) sum pairs of products in a
saturating int16 (VPMADDUBSW); VNNI CPUs accumulate exactly. The session option session.x64quantprecision=1
makes this machine use an exact u8 x u8 kernel instead, i.e. compute what a VNNI CPU computes (on a VNNI
CPU the option changes nothing and the test is trivially true). A graph whose results differ between the
two paths has CPU-dependent accuracy."""

import numpy as np

from apet_export.manifest import load_manifest
from apet_export.parity.run import vision_feeds
from apet_export.runtime.images import synthetic_image


def run_vision(path, feed, exact: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1" if exact else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def test_int8_vision_graph_gives_the_same_numbers_with_saturating_and_exact_kernels(int8_build):
    manifest = load_manifest(int8_build)
    images = [synthetic_image(seed) for seed in range(4)]
    feed = vision_feeds(int8_build, manifest, images, [64], batches=(4,))[0]  # one batch of 4 images, budget 64
    default, exact = run_vision(int8_build / "vision.onnx", feed, False), run_vision(int8_build / "vision.onnx", feed, True)
    for name, a, b in zip(("image_embeds", "keep_index", "scores"), default, exact, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)  # measured before reduce_range: embeds differed by 0.09


def test_int8_vision_graph_gives_the_same_numbers_at_1_2_and_4_threads(int8_build):
    import onnxruntime as ort

    manifest = load_manifest(int8_build)
    feed = vision_feeds(int8_build, manifest, [synthetic_image(seed) for seed in range(4)], [64], batches=(4,))[0]
    results = []
    for threads in (1, 2, 4):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(int8_build / "vision.onnx"), options, providers=["CPUExecutionProvider"])
        results.append(session.run(None, feed))
    for other in results[1:]:
        for name, a, b in zip(("image_embeds", "keep_index", "scores"), results[0], other, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
