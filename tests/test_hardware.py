"""Detection and profile matching on recorded trees of real devices (see each tree's SOURCE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_assistant.hardware import detect, parse_cpu_list
from edge_assistant.profiles import default_profiles_dir, load_profiles, match, resolve

from conftest import DEVICES, copy_device

# device, arch, board substring, features that must be found, cpus, big cpus, usable, cuda, profile, n_threads
CASES = [
    ("rpi4", "aarch64", "Raspberry Pi 4 Model B", {"asimd"}, 4, (0, 1, 2, 3), 4, False, "raspberry-pi-4", 3),
    ("rpi5", "aarch64", "Raspberry Pi 5 Model B", {"asimd", "asimddp", "asimdhp"}, 4, (0, 1, 2, 3), 4, False,
     "raspberry-pi-5", 3),
    ("jetson-orin-nano", "aarch64", "Jetson Orin Nano", {"asimddp"}, 6, (0, 1, 2, 3, 4, 5), 6, True,
     "jetson-orin", 4),
    ("x86-avx2-epyc", "x86_64", "", {"avx2", "fma", "avx", "f16c"}, 2, (0, 1), 2, False, "x86-avx2", 2),
    # big.LITTLE: only the four A76 cores count; the cgroup quota of 3 CPUs caps them; one is kept in reserve.
    ("rk3588-orangepi5", "aarch64", "Orange Pi 5", {"asimddp"}, 8, (4, 5, 6, 7), 3, False, "arm64-generic", 2),
]


@pytest.mark.parametrize(("device", "arch", "board", "features", "ncpu", "big", "usable", "cuda", "profile",
                          "threads"), CASES, ids=[c[0] for c in CASES])
def test_recorded_device(device: str, arch: str, board: str, features: set[str], ncpu: int,
                         big: tuple[int, ...], usable: int, cuda: bool, profile: str, threads: int) -> None:
    hw = detect(DEVICES / device)
    assert hw.arch == arch
    assert board in hw.board
    assert features <= hw.features
    assert len(hw.cpus) == ncpu
    assert hw.big_cpus == big
    assert hw.usable_cpus == usable
    assert hw.cuda is cuda
    assert hw.mem_total > 1 << 30
    chosen, why = match(hw, load_profiles(default_profiles_dir()))
    assert chosen.name == profile, why
    settings = resolve(chosen, hw)
    assert settings.n_threads == threads, settings.reasons["n_threads"]
    assert settings.n_threads <= hw.usable_cpus
    assert all(settings.reasons[k] for k in ("n_threads", "n_ctx", "n_gpu_layers", "quant_order", "profile"))


def test_rpi4_lacks_dot_product() -> None:
    assert "asimddp" not in detect(DEVICES / "rpi4").features


def test_jetson_release_and_full_offload() -> None:
    hw = detect(DEVICES / "jetson-orin-nano")
    assert hw.jetson.startswith("# R36 (release), REVISION: 4.7")
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    settings = resolve(profile, hw)
    assert settings.n_gpu_layers == -1
    assert "all layers on the GPU" in settings.reasons["n_gpu_layers"]


def test_rk3588_cgroup_limits_and_quota_reason() -> None:
    hw = detect(DEVICES / "rk3588-orangepi5")
    assert hw.heterogeneous
    assert hw.cpu_quota == pytest.approx(3.0)
    assert hw.mem_cgroup_limit == 2 * 1024**3
    assert hw.memory_limit == 2 * 1024**3  # the cgroup is tighter than MemAvailable
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    reason = resolve(profile, hw).reasons["n_threads"]
    assert "big cores" in reason and "cgroup quota" in reason


def test_affinity_mask_limits_threads(tmp_path: Path) -> None:
    root = copy_device("rpi5", tmp_path)
    (root / "proc/self/status").write_text("Name:\tpython3\nCpus_allowed_list:\t2-3\n")
    hw = detect(root)
    assert hw.affinity == (2, 3)
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    settings = resolve(profile, hw)
    assert settings.n_threads == 2  # two CPUs allowed: no reserve taken from so few
    assert "affinity" in settings.reasons["n_threads"]


def test_voice_reserves_a_cpu() -> None:
    hw = detect(DEVICES / "rpi5")
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    assert resolve(profile, hw, voice=True).n_threads == resolve(profile, hw).n_threads - 1


def test_live_machine_detects() -> None:
    hw = detect(Path("/"))
    assert hw.cpus and hw.mem_total > 0 and hw.usable_cpus >= 1


def test_empty_root_is_not_a_crash(tmp_path: Path) -> None:
    hw = detect(tmp_path)
    assert hw.arch == "unknown"
    assert len(hw.cpus) == 1 and hw.usable_cpus == 1
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    assert profile.name == "generic"


@pytest.mark.parametrize(("text", "expected"), [("0-3", (0, 1, 2, 3)), ("0,2,4-5", (0, 2, 4, 5)), ("7", (7,)),
                                                ("", ())])
def test_parse_cpu_list(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == expected
