"""The committed gRPC stubs are exactly what `python -m tether.proto.generate` produces."""

from tether.proto import generate


def test_committed_stubs_match_a_fresh_generation(capsys):
    assert generate.main(["--check"]) == 0, capsys.readouterr().out
