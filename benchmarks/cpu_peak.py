"""The CPU's arithmetic peak per core, to read batched-decode numbers against.

    .venv/bin/python benchmarks/cpu_peak.py [--threads 1,2]

A decode step of many rows is bound by multiply-adds, not by weight bytes, so the ceiling of
"concurrent tok/s" is (cores x multiply-adds per second) / (multiply-adds per token). This
compiles a tiny C loop with gcc (-O2, AVX2 + FMA) and times, per thread (each thread its own
loop, all at once):

- fp32 FMA: 12 independent 8-lane fused multiply-add chains (what the blocked GEMM issues),
  as GMAC/s (8 per instruction);
- int8 dot: maddubs + madd + add on 8 independent accumulators (what the int8-activation
  kernels issue per 32 values), as GMAC/s (32 per pair).

Prints the CPU flags beside the table. x86 with AVX2 only; exits with a message elsewhere.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parallax.models.quant import native  # noqa: E402

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#define N 50000000L
static double fma_rate(void) {
    __m256 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps(1.0f + 0.1f * i);
    __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    __asm__ volatile("" : "+x"(m), "+x"(c));
    double t = omp_get_wtime();
    for (long i = 0; i < N; i++)
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) a[j] = _mm256_fmadd_ps(a[j], m, c);
    t = omp_get_wtime() - t;
    __m256 s = a[0];
    for (int j = 1; j < 12; j++) s = _mm256_add_ps(s, a[j]);
    float out[8];
    _mm256_storeu_ps(out, s);
    if (out[0] == 12345.0f) puts("");
    return N * 12.0 * 8 / t / 1e9;
}
static double dot_rate(void) {
    __m256i acc[8], x[8];
    for (int i = 0; i < 8; i++) { acc[i] = _mm256_setzero_si256(); x[i] = _mm256_set1_epi8(i + 1); }
    __m256i u = _mm256_set1_epi8(3), one = _mm256_set1_epi16(1);
    __asm__ volatile("" : "+x"(u), "+x"(one));
    double t = omp_get_wtime();
    for (long i = 0; i < N; i++) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(u, x[j]), one));
        /* opaque inputs: nothing can be hoisted out of the loop */
        __asm__ volatile("" : "+x"(x[0]), "+x"(x[1]), "+x"(x[2]), "+x"(x[3]));
        __asm__ volatile("" : "+x"(x[4]), "+x"(x[5]), "+x"(x[6]), "+x"(x[7]));
    }
    t = omp_get_wtime() - t;
    int out[8];
    __m256i s = acc[0];
    for (int j = 1; j < 8; j++) s = _mm256_add_epi32(s, acc[j]);
    _mm256_storeu_si256((__m256i *)out, s);
    if (out[0] == 12345) puts("");
    return N * 8.0 * 32 / t / 1e9;
}
int main(int argc, char **argv) {
    const int threads = atoi(argv[1]);
    double fma = 0, dot = 0;
#pragma omp parallel num_threads(threads) reduction(+ : fma)
    fma += fma_rate();
#pragma omp parallel num_threads(threads) reduction(+ : dot)
    dot += dot_rate();
    printf("%.1f %.1f\n", fma, dot);
    return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args()
    flags = native.cpu_flags()
    if not {"avx2", "fma"} <= flags or shutil.which("gcc") is None:
        raise SystemExit("cpu_peak.py needs an x86 CPU with AVX2 + FMA and gcc")
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp, "peak.c"), Path(tmp, "peak")
        source.write_text(SOURCE)
        subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", "-fopenmp", "-o", str(binary),
                        str(source)], check=True, timeout=120)
        print(f"CPU flags: {native.flags_summary()}")
        print("| threads | fp32 FMA GMAC/s | int8 maddubs+madd GMAC/s |")
        print("|---|---|---|")
        for threads in (int(t) for t in args.threads.split(",")):
            out = subprocess.run([str(binary), str(threads)], check=True, capture_output=True,
                                 text=True, timeout=300).stdout.split()
            print(f"| {threads} | {float(out[0]):.1f} | {float(out[1]):.1f} |")


if __name__ == "__main__":
    main()
