"""Pipeline.encode_batch (what the server's @serve.batch calls): several requests' pictures in one vision call per
budget give each request exactly what encoding it alone gives."""

from __future__ import annotations

import numpy as np

from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline


def test_batched_encodes_equal_each_request_alone(llava_build, monkeypatch):
    requests = [([synthetic_image(0)], 32), ([synthetic_image(1), synthetic_image(2)], 64), ([synthetic_image(3)], 32)]
    with Pipeline.from_dir(llava_build) as pipeline:
        calls, encode_images = [], pipeline.encode_images
        with monkeypatch.context() as patch:  # count the vision calls and their pictures
            patch.setattr(pipeline, "encode_images", lambda *a: calls.append(len(a[0])) or encode_images(*a))
            batched = pipeline.encode_batch(requests)
        alone = [pipeline.encode_images(images, budget) for images, budget in requests]
    assert sorted(calls) == [2, 2]  # budget 32: requests 0 and 2 together; budget 64: request 1
    for (rows, _, keep), (rows_alone, _, keep_alone), (images, budget) in zip(batched, alone, requests, strict=True):
        assert len(rows) == len(images) and all(r.shape[0] == budget for r in rows)
        for a, b in zip(rows, rows_alone, strict=True):
            np.testing.assert_array_equal(a, b)  # bit-identical: the batch axis does not change any image's rows
        for a, b in zip(keep, keep_alone, strict=True):
            np.testing.assert_array_equal(a, b)
