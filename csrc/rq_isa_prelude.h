// Everything rq_kernels.inc needs, included BEFORE any `#pragma GCC target`: library code is then
// compiled for the baseline, so no AVX instruction leaks into a function another file shares.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "rq.h"
#include "rq_isa.h"
