"""Which variant of our CPU kernels a CPU runs, from /proc/cpuinfo (exo.worker.cpu_features)."""

from pathlib import Path

from exo.worker.cpu_features import AVX2_FLAGS, AVX512_VNNI_FLAGS, cpu_flags, kernels_for

# Abridged from the two development VMs (AMD EPYC) and an ARM board.
AVX512_BOX = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma f16c avx2 avx512f"
    " avx512dq avx512bw avx512vl avx512_vnni avx512_bf16\nbugs\t\t: sysret_ss_attrs\n\n"
    "processor\t: 1\nflags\t\t: fpu sse2\n"
)
AVX2_BOX = "processor\t: 0\nflags\t\t: fpu sse2 avx fma f16c avx2 bmi2 sha_ni\n"
ARM_BOARD = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes crc32\n"


def test_the_variant_follows_the_first_cpus_flags(tmp_path: Path) -> None:
    found: list[str | None] = []
    for name, text in (("vnni", AVX512_BOX), ("avx2", AVX2_BOX), ("arm", ARM_BOARD)):
        (tmp_path / name).write_text(text)
        found.append(kernels_for(cpu_flags(tmp_path / name)))
    assert found == ["avx512-vnni", "avx2", None]
    assert cpu_flags(tmp_path / "missing") is None


def test_every_flag_a_variant_needs_is_required() -> None:
    assert kernels_for(AVX2_FLAGS) == "avx2"
    assert kernels_for(AVX2_FLAGS | AVX512_VNNI_FLAGS) == "avx512-vnni"
    for flag in AVX512_VNNI_FLAGS:
        assert kernels_for(AVX2_FLAGS | AVX512_VNNI_FLAGS - {flag}) == "avx2"
    for flag in AVX2_FLAGS:
        assert kernels_for(AVX2_FLAGS - {flag} | AVX512_VNNI_FLAGS) == "none"
    assert kernels_for(None) is None
