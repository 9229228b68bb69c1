import base64
import math

import numpy as np
import pytest

from tether.common import errors
from tether.controller import uploads


def tensor(name="w", values=(1.0, 2.0, 3.0, 4.0), shape=(2, 2)):
    return uploads.TensorIn(name=name, shape=list(shape), data=np.asarray(values, dtype="<f8").tobytes())


def upload(**overrides):
    values = {
        "release": "ns/task",
        "version": 1,
        "idempotency_key": "run-1",
        "sample_count": 10,
        "metrics": {"accuracy": 0.9},
        "counts": {"clicks": 3},
        "tensors": [tensor()],
        "duration_s": 1.5,
    }
    values.update(overrides)
    return uploads.validate_result(**values)


def test_valid_result_is_encoded_as_documented():
    record = upload()
    [t] = record.tensors
    assert t["name"] == "w"
    assert t["shape"] == [2, 2]
    assert np.frombuffer(base64.b64decode(t["data"]), dtype="<f8").tolist() == [1.0, 2.0, 3.0, 4.0]
    assert record.metrics == {"accuracy": 0.9}
    assert record.counts == {"clicks": 3}


def test_scalar_and_empty_tensors_are_fine():
    record = upload(tensors=[tensor("s", (5.0,), ()), tensor("e", (), (0, 3))])
    assert [t["shape"] for t in record.tensors] == [[], [0, 3]]


@pytest.mark.parametrize(
    ("overrides", "error", "fragment"),
    [
        ({"release": ""}, errors.InvalidArgument, "release"),
        ({"version": 0}, errors.InvalidArgument, "version"),
        ({"idempotency_key": ""}, errors.InvalidArgument, "idempotency_key"),
        ({"idempotency_key": "a b"}, errors.InvalidArgument, "idempotency_key"),
        ({"idempotency_key": "k" * 129}, errors.InvalidArgument, "idempotency_key"),
        ({"sample_count": -1}, errors.InvalidArgument, "sample_count"),
        ({"duration_s": math.nan}, errors.InvalidArgument, "duration_s"),
        ({"duration_s": -1.0}, errors.InvalidArgument, "duration_s"),
        ({"metrics": {"loss": math.inf}}, errors.InvalidArgument, "metrics['loss']"),
        ({"metrics": {"loss": math.nan}}, errors.InvalidArgument, "finite"),
        ({"metrics": {"1bad": 1.0}}, errors.InvalidArgument, "metrics: name"),
        ({"metrics": {"": 1.0}}, errors.InvalidArgument, "metrics: name"),
        ({"metrics": {f"m{i}": 1.0 for i in range(uploads.MAX_METRICS + 1)}}, errors.TooLarge, "limit"),
        ({"counts": {"with space": 1}}, errors.InvalidArgument, "counts: name"),
        ({"tensors": [tensor()] * 2}, errors.InvalidArgument, "appears twice"),
        ({"tensors": [tensor(shape=(3,))]}, errors.InvalidArgument, "needs 24 bytes"),
        ({"tensors": [tensor(shape=(-1, -4))]}, errors.InvalidArgument, "non-negative"),
        ({"tensors": [tensor(values=(1.0,) * 1, shape=(1,) * 9)]}, errors.InvalidArgument, "dims"),
        ({"tensors": [tensor(values=(1.0, math.nan, 0.0, 0.0))]}, errors.InvalidArgument, "NaN"),
        ({"tensors": [tensor(name="bad name")]}, errors.InvalidArgument, "name"),
        ({"tensors": [tensor(name=f"t{i}", values=(1.0,), shape=(1,)) for i in range(65)]}, errors.TooLarge, "limit"),
    ],
)
def test_bad_uploads_are_refused_with_the_field_named(overrides, error, fragment):
    with pytest.raises(error) as info:
        upload(**overrides)
    assert fragment in str(info.value)


def test_tensor_bytes_are_bounded():
    big = tensor(values=np.zeros(1024), shape=(1024,))
    with pytest.raises(errors.TooLarge, match="bytes of data"):
        upload(tensors=[big], max_tensor_bytes=1024)
