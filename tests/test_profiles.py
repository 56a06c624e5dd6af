"""Profile rules and resolution: pure logic, table-tested on synthetic machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_assistant.errors import ConfigError
from edge_assistant.hardware import Cpu, HardwareInfo
from edge_assistant.profiles import ProfileOverrides, default_profiles_dir, load_profiles, match, resolve

GIB = 1024**3


def machine(arch: str = "x86_64", board: str = "", features: tuple[str, ...] = (), ncpu: int = 4,
            smt: bool = False, jetson: str = "", cuda: bool = False, quota: float | None = None,
            soc: str = "") -> HardwareInfo:
    cpus = tuple(Cpu(i, (0, i // 2 if smt else i), None, None, "") for i in range(ncpu))
    return HardwareInfo(arch=arch, board=board, compatible=(), cpu_model="", features=frozenset(features),
                        cpus=cpus, affinity=tuple(range(ncpu)), cpu_quota=quota, mem_total=8 * GIB,
                        mem_available=6 * GIB, mem_cgroup_limit=None, jetson=jetson, cuda=cuda,
                        cuda_reason="test", soc=soc)


PROFILES = load_profiles(default_profiles_dir())

TABLE = [
    (machine("aarch64", jetson="# R32 (release), REVISION: 7.1", cuda=True), "jetson-nano"),
    (machine("aarch64", "NVIDIA Jetson AGX Orin", jetson="# R35 (release), REVISION: 4.1", cuda=True,
             soc="tegra234"), "jetson-orin"),
    (machine("armv7l", "Raspberry Pi 3 Model B Rev 1.2", ("neon", "vfpv4")), "raspberry-pi-3"),
    (machine("aarch64", "Raspberry Pi 5 Model B Rev 1.0", ("asimd", "asimddp")), "raspberry-pi-5"),
    (machine("aarch64", "Raspberry Pi Compute Module 4 Rev 1.0", ("asimd",)), "raspberry-pi-4"),
    (machine("x86_64", features=("avx2", "avx512f"), ncpu=16, smt=True), "x86-avx512"),
    (machine("x86_64", features=("avx2", "fma")), "x86-avx2"),
    (machine("x86_64", features=("avx2",), cuda=True), "x86-cuda"),
    (machine("x86_64", features=("avx",)), "x86-baseline"),
    (machine("aarch64", "Rockchip RK3566 board", ("asimd",)), "arm64-generic"),
    (machine("riscv64"), "generic"),
]


@pytest.mark.parametrize(("hw", "expected"), TABLE, ids=[t[1] for t in TABLE])
def test_first_match_wins(hw: HardwareInfo, expected: str) -> None:
    assert match(hw, PROFILES)[0].name == expected


def test_every_shipped_profile_is_reachable_and_valid() -> None:
    names = {p.name for p in PROFILES}
    assert names == {t[1] for t in TABLE}
    assert PROFILES[-1].name == "generic" and not PROFILES[-1].match.failures(machine("whatever"))


def test_physical_policy_counts_smt_pairs_once() -> None:
    hw = machine("x86_64", features=("avx2", "avx512f"), ncpu=16, smt=True)
    profile, _ = match(hw, PROFILES)
    settings = resolve(profile, hw)
    assert settings.n_threads == 7  # 8 physical cores, one kept for MQTT and housekeeping
    assert "8 physical cores" in settings.reasons["n_threads"]


def test_gpu_layers_dropped_without_cuda() -> None:
    hw = machine("aarch64", "Raspberry Pi 5")
    profile = next(p for p in PROFILES if p.name == "jetson-orin")
    settings = resolve(profile, hw)
    assert settings.n_gpu_layers == 0
    assert "no CUDA device" in settings.reasons["n_gpu_layers"]


def test_config_overrides_any_setting() -> None:
    hw = machine("x86_64", features=("avx2",))
    profile, _ = match(hw, PROFILES)
    ov = ProfileOverrides(n_ctx=512, n_threads=1, quant_order=("Q8_0",), use_mlock=True)
    s = resolve(profile, hw, ov)
    assert (s.n_ctx, s.n_threads, s.quant_order, s.use_mlock) == (512, 1, ("Q8_0",), True)
    assert s.reasons["n_ctx"] == "512: config override"
    assert "config override" in s.reasons["n_threads"]


def test_forced_profile_and_unknown_name() -> None:
    hw = machine("x86_64", features=("avx2",))
    assert match(hw, PROFILES, "raspberry-pi-4")[0].name == "raspberry-pi-4"
    with pytest.raises(ConfigError, match=r"profile\.name: no profile named 'nope'"):
        match(hw, PROFILES, "nope")


def test_cpu_quota_caps_threads() -> None:
    hw = machine("x86_64", features=("avx2",), ncpu=8, quota=1.5)
    s = resolve(match(hw, PROFILES)[0], hw)
    assert s.n_threads == 1
    assert "cgroup quota of 1.5 CPUs" in s.reasons["n_threads"]


@pytest.mark.parametrize(("body", "message"), [
    ('name="x"\ndescription="d"\n[settings]\nquant_order=[]\n', "settings.quant_order: must name at least one"),
    ('name="x"\ndescription="d"\n[settings]\nquant_order=["Q4_0"]\nn_ctx="big"\n',
     "settings.n_ctx: expected an integer, got a string"),
    ('name="x"\ndescription="d"\n[settings]\nquant_order=["Q4_0"]\nthreads="most"\n',
     "settings.threads: must be one of"),
    ('name="x"\ndescription="d"\ncolour="red"\n[settings]\nquant_order=["Q4_0"]\n', "colour: unknown key"),
    ('name="x"\n[settings]\nquant_order=["Q4_0"]\n', "description: required key is missing"),
    ('name="x"\ndescription="d"\n[match]\nboard="Pi"\n[settings]\nquant_order=["Q4_0"]\n',
     "match.board: expected an array"),
])
def test_bad_profile_names_the_key(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_profiles(tmp_path)
    assert "bad.toml" in info.value.message


def test_no_catch_all_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pi.toml").write_text('name="pi"\ndescription="d"\n[match]\nboard=["Raspberry"]\n'
                                      '[settings]\nquant_order=["Q4_0"]\n')
    with pytest.raises(ConfigError, match="no hardware profile matches"):
        match(machine(), load_profiles(tmp_path))
