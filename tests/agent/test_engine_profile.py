"""Device profile: /proc parsing, GPUs from sysfs, the fingerprint."""

from __future__ import annotations

import dataclasses

from tether.agent import profile

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512_vnni aes
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512_vnni aes
"""
ARM = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd0c
processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_parse_x86_cpuinfo() -> None:
    model, cores, flags = profile.parse_cpuinfo(X86)
    assert model == "AMD EPYC 7B13" and cores == 2
    assert profile.simd_flags(flags) == ("avx", "avx2", "avx512_vnni", "avx512f", "f16c", "fma", "sse4_1", "sse4_2")


def test_parse_arm_cpuinfo_and_fp16() -> None:
    model, cores, flags = profile.parse_cpuinfo(ARM)
    assert model == "arm 0x41:0xd0c" and cores == 2
    simd = profile.simd_flags(flags)
    assert {"asimd", "asimdhp", "asimddp", "fphp", "i8mm"} <= set(simd) and "aes" not in simd
    p = profile.DeviceProfile("aarch64", model, cores, simd, 8000, (), ("mnn/cpu",))
    assert p.fp16
    assert not dataclasses.replace(p, simd=("asimd",)).fp16


def test_parse_meminfo() -> None:
    assert profile.parse_meminfo("MemTotal:       24681024 kB\nMemFree: 1 kB\n") == 24102
    assert profile.parse_meminfo("nothing here") == 0


def test_fingerprint_tracks_what_changes_the_choice_only() -> None:
    p = profile.DeviceProfile("x86_64", "EPYC", 4, ("avx2",), 16000, (), ("mnn/cpu",), {"mnn": "3.6.1"}, 50.0)
    same = dataclasses.replace(p, gflops_per_core=40.0, memory_mb=15000)  # noisy or irrelevant: no change
    assert p.fingerprint == same.fingerprint and p.fingerprint.startswith("sha256:")
    for changed in (
        dataclasses.replace(p, engines={"mnn": "3.7.0"}),
        dataclasses.replace(p, backends=("mnn/cpu", "onnxruntime/cuda")),
        dataclasses.replace(p, cores=8),
        dataclasses.replace(p, simd=("avx2", "avx512f")),
        dataclasses.replace(p, gpus=("nvidia:H100",)),
    ):
        assert changed.fingerprint != p.fingerprint
    assert profile.DeviceProfile.from_json(p.to_json()) == p


def test_detect_gpus_from_proc_and_sysfs(tmp_path) -> None:
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    info = proc / "driver/nvidia/gpus/0000:01:00.0"
    info.mkdir(parents=True)
    (info / "information").write_text("Model: \t NVIDIA H100 80GB HBM3\nIRQ: 1\n")
    for card, vendor in (("card0", "0x10de"), ("card1", "0x1002")):
        (sys_root / "class/drm" / card / "device").mkdir(parents=True)
        (sys_root / "class/drm" / card / "device/vendor").write_text(vendor + "\n")
    (sys_root / "class/drm/card0-HDMI-A-1").mkdir()
    assert profile.detect_gpus(proc=str(proc), sys_root=str(sys_root)) == ("nvidia:NVIDIA H100 80GB HBM3", "amd:card1")
    assert profile.detect_gpus(proc=str(tmp_path / "none"), sys_root=str(tmp_path / "none")) == ()


def test_collect_with_known_backends() -> None:
    p = profile.collect(backends=["mnn/cpu"], measure=False)
    assert p.backends == ("mnn/cpu",) and p.cores >= 1 and "mnn" in p.engines and p.gflops_per_core == 0.0
