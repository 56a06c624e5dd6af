"""Detection and profile matching on recorded trees of real devices (see each tree's SOURCE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_assistant.hardware import detect, parse_cpu_list
from edge_assistant.profiles import ProfileOverrides, default_profiles_dir, load_profiles, match, resolve

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


# Every recorded tree: what detection and the profiles must decide. The expected values are those written in each
# tree's SOURCE.md before the detector first ran on it.
# device, profile, generation threads, batch threads, GPU layers, quantizations first, reason the threads must give
TRUTH = [
    ("rpi4", "raspberry-pi-4", 3, 4, 0, ("Q4_0", "Q4_1"), "4 CPUs; 1 kept"),
    ("rpi5", "raspberry-pi-5", 3, 4, 0, ("Q4_0", "Q4_K_M"), "4 CPUs; 1 kept"),
    ("jetson-orin-nano", "jetson-orin", 4, 4, -1, ("Q4_K_M", "Q4_0"), "every layer on the GPU"),
    ("x86-avx2-epyc", "x86-avx2", 2, 2, 0, ("Q4_K_M", "Q4_0"), "no reserve with 2 or fewer CPUs"),
    ("rk3588-orangepi5", "arm64-generic", 2, 3, 0, ("Q4_0", "Q4_K_M"), "capped to 3 by the cgroup quota"),
    ("rpi3-raspbian-32bit", "raspberry-pi-3", 3, 3, 0, ("Q4_0", "Q4_1", "Q4_K_M"), "4 CPUs; 1 kept"),
    ("rpi-zero2w-one-block", "raspberry-pi-3", 3, 3, 0, ("Q4_0", "Q4_1", "Q4_K_M"), "4 CPUs; 1 kept"),
    ("jetson-agx-orin-container", "jetson-orin", 4, 4, -1, ("Q4_K_M", "Q4_0"), "at most 4 (profile jetson-orin, "
                                                                               "every layer on the GPU)"),
    ("jetson-orin-nano-no-release", "jetson-orin", 4, 4, -1, ("Q4_K_M", "Q4_0"), "every layer on the GPU"),
    ("rk3588-cpuinfo-only", "arm64-generic", 4, 4, 0, ("Q4_0", "Q4_K_M"),
     "4 big cores (4 little cores left out); none kept free"),
    ("intel-i7-12700k-hybrid", "x86-avx2", 8, 8, 0, ("Q4_K_M", "Q4_0"),
     "8 performance physical cores (4 efficiency cores left out); none kept free"),
    ("intel-i7-1250u-openwrt", "x86-avx2", 2, 2, 0, ("Q4_K_M", "Q4_0"),
     "2 performance physical cores (8 efficiency cores left out)"),
    ("celeron-j4105-futro-s740", "x86-baseline", 3, 3, 0, ("Q4_0", "Q4_1"), "4 physical cores; 1 kept"),
    ("amd-ryzen5-surface-apu", "x86-avx2", 5, 5, 0, ("Q4_K_M", "Q4_0"), "6 physical cores; 1 kept"),
    ("jetson-agx-orin-64gb-devkit", "jetson-orin", 4, 4, -1, ("Q4_K_M", "Q4_0"), "every layer on the GPU"),
    ("jetson-agx-orin-r39", "jetson-orin", 4, 4, -1, ("Q4_K_M", "Q4_0"), "every layer on the GPU"),
    ("jetson-orin-nano-r35", "jetson-orin", 4, 4, -1, ("Q4_K_M", "Q4_0"), "every layer on the GPU"),
    ("intel-i7-1360p-no-core-id", "x86-avx2", 4, 4, 0, ("Q4_K_M", "Q4_0"),
     "4 performance physical cores (8 efficiency cores left out); none kept free"),
]


def test_every_recorded_tree_is_in_the_table() -> None:
    assert sorted(t[0] for t in TRUTH) == sorted(p.name for p in DEVICES.iterdir() if p.is_dir())
    assert all((DEVICES / t[0] / "SOURCE.md").is_file() for t in TRUTH)


@pytest.mark.parametrize(("device", "profile", "threads", "batch", "gpu", "quants", "why"), TRUTH,
                         ids=[t[0] for t in TRUTH])
def test_hardware_truth(device: str, profile: str, threads: int, batch: int, gpu: int, quants: tuple[str, ...],
                        why: str) -> None:
    hw = detect(DEVICES / device)
    chosen, reason = match(hw, load_profiles(default_profiles_dir()))
    assert chosen.name == profile, reason
    s = resolve(chosen, hw)
    assert (s.n_threads, s.n_threads_batch, s.n_gpu_layers) == (threads, batch, gpu), s.reasons
    assert s.quant_order[: len(quants)] == quants
    assert why in s.reasons["n_threads"]


def test_partial_and_32bit_cpuinfo() -> None:
    pi3 = detect(DEVICES / "rpi3-raspbian-32bit")
    assert pi3.arch == "armv7l" and {"neon", "vfpv4", "idiva"} <= pi3.features and len(pi3.cpus) == 4
    assert pi3.cpu_model == "ARMv7 Processor rev 4 (v7l)"
    zero = detect(DEVICES / "rpi-zero2w-one-block")  # one cpuinfo block; sysfs says four CPUs
    assert zero.arch == "aarch64" and len(zero.cpus) == 4 and zero.board == "Raspberry Pi Zero 2 W Rev 1.0"
    celeron = detect(DEVICES / "celeron-j4105-futro-s740")  # one block without a processor line
    assert celeron.arch == "x86_64" and len(celeron.cpus) == 4 and celeron.physical_cores == 4
    assert "avx" not in celeron.features


def test_big_cores_from_part_numbers_alone() -> None:
    hw = detect(DEVICES / "rk3588-cpuinfo-only")
    assert hw.big_cpus == (4, 5, 6, 7) and hw.core_names == ("big", "little")
    assert {c.core_name for c in hw.cpus} == {"Cortex-A55", "Cortex-A76"}


def test_intel_hybrid_from_sysfs_and_from_smt() -> None:
    k = detect(DEVICES / "intel-i7-12700k-hybrid")
    assert k.big_cpus == tuple(range(16)) and k.core_names == ("performance", "efficiency")
    u = detect(DEVICES / "intel-i7-1250u-openwrt")  # Linux 5.10: no cpu_core/cpu_atom; SMT tells them apart
    assert u.big_cpus == (0, 1, 2, 3) and {c.kind for c in u.cpus} == {"performance", "efficiency"}
    amd = detect(DEVICES / "amd-ryzen5-surface-apu")  # SMT on every core: alike
    assert not amd.heterogeneous and amd.physical_cores == 6


def test_jetson_orin_found_without_release_file_or_device_tree() -> None:
    container = detect(DEVICES / "jetson-agx-orin-container")  # release file, no device tree
    assert container.soc == "tegra234" and container.compatible == () and container.cuda
    custom = detect(DEVICES / "jetson-orin-nano-no-release")  # device tree, no release file
    assert custom.soc == "tegra234" and custom.jetson == "" and custom.cuda
    assert "compatible nvidia," in custom.cuda_reason


@pytest.mark.parametrize(("device", "compatible_last"), [
    ("jetson-agx-orin-64gb-devkit", "nvidia,tegra23x"),  # the list ends in the family, after the SoC
    ("jetson-orin-nano-r35", "nvidia,tegra23x"),
    ("jetson-agx-orin-r39", "nvidia,p3737-0000+p3701-0000"),  # the board string alone: the module names the SoC
])
def test_orin_soc_from_known_strings_not_the_last(device: str, compatible_last: str) -> None:
    hw = detect(DEVICES / device)
    assert hw.compatible[-1] == compatible_last
    assert hw.soc == "tegra234" and hw.cuda
    assert match(hw, load_profiles(default_profiles_dir()))[0].name == "jetson-orin"


def test_soc_fallbacks(tmp_path: Path) -> None:
    root = copy_device("rpi4", tmp_path)
    (root / "proc/device-tree/compatible").write_text("acme,widget-1\0acme,soc9\0")
    assert detect(root).soc == "soc9"  # nothing known: the last string's tail, as before
    (root / "proc/device-tree/compatible").write_text("nvidia,p3449-0000-b00+p3448-0000-b00\0nvidia,jetson-nano\0")
    assert detect(root).soc == "tegra210"  # Jetson Nano module p3448


def test_orin_thread_cap_follows_the_offload() -> None:
    hw = detect(DEVICES / "jetson-agx-orin-container")
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    assert resolve(profile, hw).n_threads == 4  # every layer on the GPU: the CPU only feeds it
    partial = resolve(profile, hw, ProfileOverrides(n_gpu_layers=20))
    assert partial.n_threads == 8 and "at most 8 (profile jetson-orin)" in partial.reasons["n_threads"]


def test_intel_hybrid_without_core_ids() -> None:
    hw = detect(DEVICES / "intel-i7-1360p-no-core-id")  # siblings 16, cpu cores 12, no core id lines
    assert len(hw.cpus) == 16 and hw.physical_cores == 12
    assert hw.big_cpus == tuple(range(8)) and hw.core_names == ("performance", "efficiency")
    assert hw.cpus[0].core == hw.cpus[1].core != hw.cpus[2].core  # the P-cores' threads pair (0, 1), (2, 3), ...
    assert len({c.core for c in hw.cpus[8:]}) == 8  # one thread on each E-core


def test_smt_on_every_core_without_core_ids(tmp_path: Path) -> None:
    root = copy_device("amd-ryzen5-surface-apu", tmp_path)  # siblings 12, cpu cores 6
    cpuinfo = root / "proc/cpuinfo"
    cpuinfo.write_text("".join(line for line in cpuinfo.read_text().splitlines(keepends=True)
                               if not line.startswith("core id")))
    hw = detect(root)
    assert hw.physical_cores == 6 and not hw.heterogeneous
    assert hw.cpus[0].core == hw.cpus[6].core  # Linux lists every core's first thread, then the second
    profile, _ = match(hw, load_profiles(default_profiles_dir()))
    assert resolve(profile, hw).n_threads == 5


@pytest.mark.parametrize("device", ["jetson-agx-orin-64gb-devkit", "jetson-agx-orin-r39", "jetson-orin-nano-r35"])
def test_detect_json_orin_full_offload(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_assistant.cli import main

    assert main(["detect", "--json", "--root", str(DEVICES / device), "--log-level", "ERROR"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["soc"] == "tegra234" and out["hardware"]["cuda"] is True
    assert out["settings"]["profile"] == "jetson-orin" and out["settings"]["n_gpu_layers"] == -1


def test_detect_json_is_plain_and_stable(capsys: pytest.CaptureFixture[str]) -> None:
    from edge_assistant.cli import DETECT_SCHEMA, main

    assert main(["detect", "--json", "--root", str(DEVICES / "intel-i7-12700k-hybrid"), "--log-level", "ERROR"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == DETECT_SCHEMA == 1
    hw, settings = out["hardware"], out["settings"]
    assert hw["features"] == ["avx", "avx2", "avx_vnni", "f16c", "fma"]  # a list, not a set's repr
    assert hw["heterogeneous"] is True and hw["big_cpus"] == list(range(16))
    assert {c["kind"] for c in hw["cpus"]} == {"performance", "efficiency"}
    assert settings["n_threads"] == 8 and settings["quant_order"][0] == "Q4_K_M"
    assert "4 efficiency cores left out" in settings["reasons"]["n_threads"]


def test_detect_shows_the_kv_caches_of_parallel_slots_in_the_budget(tmp_path: Path, model_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from edge_assistant.cli import main

    config = tmp_path / "config.toml"
    config.write_text(f'[model]\ndir = "{model_path.parent}"\n[profile]\nparallel = 4\n')
    assert main(["detect", "--root", str(DEVICES / "rpi4"), "--config", str(config), "--log-level", "ERROR"]) == 0
    out = capsys.readouterr().out
    assert "parallel         4: config override; a KV cache of n_ctx for each slot counts" in out
    assert "Model: SmolLM2-135M-Instruct.Q4_1.gguf, n_ctx 1024, 4 slots" in out
    assert "KV 4 x 22 + 64 buffers) of a " in out
