/* The blur part of DARK decoding (transpose_jax/evaluation/decode.py, `_dark`)
 * in C, bit-identical to the Python path and so to the official code.
 *
 * Per float32 map: the first maximum (np.argmax), the exact OpenCV blur of the
 * (2 region + 1)^2 pixels around it, and the bound of `decode._dark` that
 * proves the blurred maximum lies there; a second region around the largest
 * value outside the first core box when the bound does not settle it, the
 * whole map blurred when that does not either; then the 5x5 blurred values
 * around the maximum rescaled to the map maximum and clamped at 1e-10 (the
 * float32 operations of decode._refine), for numpy's log (decode.py) and
 * the Newton step after it (dark_newton).
 *
 * With the device's `peak_statistics` (decode.py, computed with the
 * forward: each map's first maximum, the largest value outside its core
 * box, where that value first occurs (the second maximum) and the largest
 * value beyond both boxes, and windows of the map around the two maxima),
 * a map is read at its maximum only, the regions are blurred from the
 * windows: reading whole maps from memory was most of dark_maps' time
 * (benchmarks/eval_host.py prints the decoding time with and without
 * them). Maps the two regions do not settle are blurred whole as without
 * them; statistics that do not fit the map where that is cheap to see send
 * it the scanning way.
 *
 * The blur is cv2.GaussianBlur of the zero-padded map in a float64 canvas as
 * OpenCV 5 runs it for CV_64F (a separable filter, RowFilter then
 * SymmColumnFilter): per output pixel, the row pass
 *     s = k[0] x[0]; s += k[j] x[j], j = 1 .. ksize - 1
 * and the column pass on the row results (ky = the kernel's centre, r its
 * radius)
 *     s = ky[0] t[0] + 0.0; s += ky[j] (t[j] + t[-j]), j = 1 .. r.
 * Whether each `+=` is one fused multiply-add depends on how OpenCV was
 * compiled for the CPU it runs on (GCC contracts them in its AVX2 build of
 * the row filter); `variant` says which pass fuses (bit 0: rows, bit 1:
 * columns) and dark_native.py picks it by comparing with cv2 on first use
 * (decode.py then checks the whole path against its numpy one). This file
 * must be compiled without contraction (-ffp-contract=off) and without
 * -ffast-math: every rounding is written out. Where the CPU has AVX2 + FMA
 * the hot parts run as AVX2 intrinsics, with the same operations per pixel.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RADIUS 15          /* kernel sizes up to 31 */
#define MAX_REGION 8
#define MAX_PATCH (2 * (MAX_REGION + MAX_RADIUS) + 1)
#define MAX_WIDTH 1024
/* `peak_statistics` windows (decode.py): rows cy - 10 .. cy + 10, columns
 * cx - 10 .. cx + 11 of a map around a maximum (cy, cx): what
 * region_blur_11_5 reads */
#define WINDOW_ROWS 21
#define WINDOW_COLS 22
#define WINDOW (WINDOW_ROWS * WINDOW_COLS)
/* columns of a map's `peak_statistics` stats: the flat index of its first
 * maximum (-1: the map holds a NaN or an infinity), the bits of max(+0.0,
 * the largest value outside its core box), the flat index of that value's
 * first occurrence outside the box, the bits of max(+0.0, the largest value
 * outside both boxes) */
enum { FIRST = 0, FIRST_REST = 1, SECOND = 2, SECOND_REST = 3 };

/* status of a map */
enum {
  REFINED = 0,       /* Newton step pending (first or second region) */
  BORDER = 1,        /* maximum > 0 within 2 px of the border: no Newton step */
  PYTHON = 2,        /* not handled here (maximum <= 0, NaN / inf, too small) */
  REFINED_WHOLE = 3  /* as REFINED, the map was blurred whole */
};

int dark_abi_version(void) { return 10; }

static inline __attribute__((always_inline)) double row_step(
    double s, double k, double x, int fused) {
  return fused ? fma(k, x, s) : s + k * x;
}

/* Row pass of `rows` rows of the zero-padded float64 patch `in` (stride
 * `in_stride`), `cols` outputs per row into `out` (stride `out_stride`). */
static inline __attribute__((always_inline)) void row_pass(
    const double *in, int in_stride, int rows, int cols, const double *k,
    int ksize, int fused, double *out, int out_stride) {
  for (int y = 0; y < rows; y++) {
    const double *src = in + (long)y * in_stride;
    double *dst = out + (long)y * out_stride;
    for (int x = 0; x < cols; x++) dst[x] = k[0] * src[x];
    for (int j = 1; j < ksize; j++) {
      const double kj = k[j];
      const double *s = src + j;
      for (int x = 0; x < cols; x++) dst[x] = row_step(dst[x], kj, s[x], fused);
    }
  }
}

/* Column pass: output row y reads row-pass rows y .. y + 2r of `in`. */
static inline __attribute__((always_inline)) void column_pass(
    const double *in, int in_stride, int rows, int cols, const double *k,
    int radius, int fused, double *out, int out_stride) {
  const double *ky = k + radius;
  for (int y = 0; y < rows; y++) {
    const double *mid = in + (long)(y + radius) * in_stride;
    double *dst = out + (long)y * out_stride;
    for (int x = 0; x < cols; x++) dst[x] = ky[0] * mid[x] + 0.0;
    for (int j = 1; j <= radius; j++) {
      const double kj = ky[j];
      const double *below = mid + (long)j * in_stride;
      const double *above = mid - (long)j * in_stride;
      for (int x = 0; x < cols; x++)
        dst[x] = row_step(dst[x], kj, below[x] + above[x], fused);
    }
  }
}

static inline __attribute__((always_inline)) void blur_rect(
    const double *patch, int stride, int rows, int cols, const double *k,
    int ksize, int variant, double *tmp, double *out, int out_stride) {
  /* patch: (rows + ksize - 1) x (cols + ksize - 1) */
  int radius = (ksize - 1) / 2;
  if (variant & 1)
    row_pass(patch, stride, rows + 2 * radius, cols, k, ksize, 1, tmp, cols);
  else
    row_pass(patch, stride, rows + 2 * radius, cols, k, ksize, 0, tmp, cols);
  if (variant & 2)
    column_pass(tmp, cols, rows, cols, k, radius, 1, out, out_stride);
  else
    column_pass(tmp, cols, rows, cols, k, radius, 0, out, out_stride);
}

static inline __attribute__((always_inline)) void blur_impl(
    const double *canvas, int stride, int rows, int cols, const double *k,
    int ksize, int variant, double *tmp, double *out) {
  blur_rect(canvas, stride, rows, cols, k, ksize, variant, tmp, out, cols);
}

/* The exact blur of the (2 region + 1)^2 pixels around (cy, cx) of a map:
 * the largest (float32) value among those in the map, and, when stencil is
 * not NULL, the 5x5 values around (cy, cx) (float32). */
static inline __attribute__((always_inline)) float region_blur(
    const float *map, int h, int w, int cy, int cx, int region,
    const double *k, int ksize, int variant, float *stencil) {
  int radius = (ksize - 1) / 2, reach = region + radius;
  /* Columns computed: a multiple of 4 (whole vectors), the extra ones
   * dropped. */
  int size = 2 * region + 1, cols = (size + 3) & ~3;
  int rows = 2 * reach + 1, span = cols + 2 * radius;
  double patch[MAX_PATCH * (MAX_PATCH + 3)];
  double tmp[MAX_PATCH * (2 * MAX_REGION + 4)];
  double out[(2 * MAX_REGION + 1) * (2 * MAX_REGION + 4)];
  for (int i = 0; i < rows; i++) {
    int y = cy - reach + i;
    double *row = patch + i * span;
    if (y < 0 || y >= h) {
      memset(row, 0, sizeof(double) * span);
      continue;
    }
    const float *src = map + (long)y * w;
    int x0 = cx - reach, j0 = x0 < 0 ? -x0 : 0;
    int j1 = x0 + span > w ? w - x0 : span;
    for (int j = 0; j < j0; j++) row[j] = 0.0;
    for (int j = j0; j < j1; j++) row[j] = (double)src[x0 + j];
    for (int j = j1; j < span; j++) row[j] = 0.0;
  }
  blur_rect(patch, span, size, cols, k, ksize, variant, tmp, out, cols);
  float best = -INFINITY;
  for (int i = 0; i < size; i++) {
    int y = cy - region + i;
    if (y < 0 || y >= h) continue;
    for (int j = 0; j < size; j++) {
      int x = cx - region + j;
      if (x < 0 || x >= w) continue;
      float v = (float)out[i * cols + j];
      if (v > best) best = v;
    }
  }
  if (stencil)
    for (int i = 0; i < 5; i++)
      for (int j = 0; j < 5; j++)
        stencil[i * 5 + j] = (float)out[(region - 2 + i) * cols + region - 2 + j];
  return best;
}

/* The largest (float32) value of the whole blurred map. */
static inline __attribute__((always_inline)) float whole_blur(
    const float *map, int h, int w, const double *k, int ksize, int variant,
    double *work) {
  int radius = (ksize - 1) / 2;
  int stride = w + 2 * radius, rows = h + 2 * radius;
  double *canvas = work;
  double *tmp = canvas + (long)rows * stride;
  double *out = tmp + (long)rows * w;
  memset(canvas, 0, sizeof(double) * rows * stride);
  for (int y = 0; y < h; y++)
    for (int x = 0; x < w; x++)
      canvas[(long)(y + radius) * stride + radius + x] = (double)map[(long)y * w + x];
  blur_rect(canvas, stride, h, w, k, ksize, variant, tmp, out, w);
  float best = -INFINITY;
  for (long i = 0; i < (long)h * w; i++) {
    float v = (float)out[i];
    if (v > best) best = v;
  }
  return best;
}

/* The largest value outside the (2 core + 1)^2 boxes around (ys[i], xs[i]),
 * i < boxes, and (when where is not NULL) the flat index of its first
 * occurrence (row-major, as np.argmax; -1 if every pixel is in a box).
 * rowmax: each row's maximum. */
static float outside_max(const float *map, int h, int w, const float *rowmax,
                         const int *ys, const int *xs, int boxes, int core,
                         long *where) {
  float best = -INFINITY;
  int at_y = -1, at_x = -1;  /* at_x -1: the first maximum of row at_y */
  for (int y = 0; y < h; y++) {
    /* The columns of the boxes that meet this row, in increasing order. */
    int lo[2], hi[2], n = 0;
    for (int b = 0; b < boxes; b++)
      if (abs(y - ys[b]) <= core) {
        lo[n] = xs[b] - core;
        hi[n] = xs[b] + core;
        n++;
      }
    if (n == 0) {
      if (rowmax[y] > best) {
        best = rowmax[y];
        at_y = y;
        at_x = -1;
      }
      continue;
    }
    if (n == 2 && lo[1] < lo[0]) {
      int t = lo[0]; lo[0] = lo[1]; lo[1] = t;
      t = hi[0]; hi[0] = hi[1]; hi[1] = t;
    }
    const float *row = map + (long)y * w;
    int start = 0;
    for (int s = 0; s <= n; s++) {
      int end = s < n ? (lo[s] < w ? lo[s] : w) : w;
      for (int x = start; x < end; x++)
        if (row[x] > best) {
          best = row[x];
          at_y = y;
          at_x = x;
        }
      if (s < n && hi[s] + 1 > start) start = hi[s] + 1;
    }
  }
  if (where) {
    if (at_y >= 0 && at_x < 0) {
      const float *row = map + (long)at_y * w;
      at_x = 0;
      while (row[at_x] != best) at_x++;
    }
    *where = at_y < 0 ? -1 : (long)at_y * w + at_x;
  }
  return best;
}

/* The next map's cache lines still to prefetch. Its bytes arrive while this
 * map is computed on only when the prefetches are spread over that work (a
 * few lines per loop iteration: one per row of the scan, four per row of
 * the region's blur, 192 lines for a 64 x 48 map): issued in one burst they
 * queue behind each other and the work waits as for plain loads (measured
 * here: 2.0 us per map in a burst, 1.65 us spread, 1.1 us from the cache). */
struct ahead {
  const char *at, *end;
};

static inline __attribute__((always_inline)) void pump(struct ahead *next,
                                                       int lines) {
  for (int i = 0; i < lines && next->at < next->end; i++, next->at += 64)
    __builtin_prefetch(next->at, 0, 3);
}

/* Each row's maximum into rowmax; whether the map holds a NaN or an
 * infinity (then the maxima are meaningless). Eight lanes written out so
 * that the compiler vectorizes it (the order of a maximum of finite values
 * does not matter). */
static int scan_rows(const float *map, int h, int w, float *rowmax,
                     struct ahead *next) {
  (void)next;
  uint32_t special[8] = {0};
  for (int y = 0; y < h; y++) {
    const float *row = map + (long)y * w;
    float best[8];
    int x = 0;
    for (int j = 0; j < 8; j++) best[j] = row[0];
    for (; x + 8 <= w; x += 8)
      for (int j = 0; j < 8; j++) {
        float v = row[x + j];
        uint32_t bits;
        memcpy(&bits, &v, 4);
        special[j] |= (bits & 0x7f800000u) == 0x7f800000u;
        best[j] = v > best[j] ? v : best[j];
      }
    for (; x < w; x++) {
      float v = row[x];
      uint32_t bits;
      memcpy(&bits, &v, 4);
      special[0] |= (bits & 0x7f800000u) == 0x7f800000u;
      best[0] = v > best[0] ? v : best[0];
    }
    float m = best[0];
    for (int j = 1; j < 8; j++) m = best[j] > m ? best[j] : m;
    rowmax[y] = m;
  }
  uint32_t any = 0;
  for (int j = 0; j < 8; j++) any |= special[j];
  return any != 0;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* scan_rows with AVX2 (GCC does not vectorize the float maximum itself);
 * _mm256_max_ps is the maximum for values that are not NaN. */
__attribute__((target("avx2,fma"))) static int scan_rows_avx2(
    const float *map, int h, int w, float *rowmax, struct ahead *next) {
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  __m256i special = _mm256_setzero_si256();
  uint32_t tail_special = 0;
  for (int y = 0; y < h; y++) {
    const float *row = map + (long)y * w;
    __m256 best = _mm256_set1_ps(row[0]);
    int x = 0;
    pump(next, 1);
    for (; x + 8 <= w; x += 8) {
      __m256 v = _mm256_loadu_ps(row + x);
      special = _mm256_or_si256(special, _mm256_cmpeq_epi32(
          _mm256_and_si256(_mm256_castps_si256(v), exponent), exponent));
      best = _mm256_max_ps(v, best);
    }
    /* Horizontal maximum: max of the lanes, by halves. */
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(best),
                             _mm256_extractf128_ps(best, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
    float m = _mm_cvtss_f32(half);
    for (; x < w; x++) {
      float v = row[x];
      uint32_t bits;
      memcpy(&bits, &v, 4);
      tail_special |= (bits & 0x7f800000u) == 0x7f800000u;
      m = v > m ? v : m;
    }
    rowmax[y] = m;
  }
  return tail_special || !_mm256_testz_si256(special, special);
}
#else
#define scan_rows_avx2 scan_rows
#endif

#if defined(__x86_64__) || defined(__i386__)
/* region_blur for kernel 11 and region 5, in AVX2: the same operations per
 * pixel (fma: _mm256_fmadd_pd, one rounding as fma()); stencil may be NULL.
 * window: NULL, or the map's pixels (cy - 10 .. cy + 10, cx - 10 .. cx + 11)
 * as [WINDOW_ROWS, WINDOW_COLS] floats, zeros beyond the map (the device's,
 * `peak_statistics`): read instead of the map. */
__attribute__((target("avx2,fma"))) static float region_blur_11_5(
    const float *map, int h, int w, int cy, int cx, const double *k,
    int variant, float *stencil, struct ahead *next, const float *window) {
  __m256d t[21][3];
  __m256d kv[11];
  for (int j = 0; j < 11; j++) kv[j] = _mm256_set1_pd(k[j]);
  int x0 = cx - 10;
  int inside_x = x0 >= 0 && x0 + 22 <= w;
  /* All rows converted first, then the row pass: loading a vector that
   * straddles two stores still in flight stalls (no store forwarding). */
  double rows[21][24];
  for (int i = 0; i < 21; i++) {
    int y = cy - 10 + i;
    double *row = rows[i];
    if (y < 0 || y >= h) continue;
    const float *src = map + (long)y * w;
    if (window) {
      const float *at = window + i * WINDOW_COLS;
      for (int j = 0; j < 20; j += 4)
        _mm256_storeu_pd(row + j, _mm256_cvtps_pd(_mm_loadu_ps(at + j)));
      row[20] = at[20];
      row[21] = at[21];
    } else if (inside_x) {
      for (int j = 0; j < 20; j += 4)
        _mm256_storeu_pd(row + j, _mm256_cvtps_pd(_mm_loadu_ps(src + x0 + j)));
      row[20] = src[x0 + 20];
      row[21] = src[x0 + 21];
    } else {  /* near the left or right border: zeros beyond it */
      for (int j = 0; j < 24; j += 4) {
        __m128i x = _mm_add_epi32(_mm_set1_epi32(x0 + j),
                                  _mm_setr_epi32(0, 1, 2, 3));
        __m128i in = _mm_andnot_si128(
            _mm_cmplt_epi32(x, _mm_setzero_si128()),
            _mm_cmplt_epi32(x, _mm_set1_epi32(w)));
        /* masked lanes read nothing (not even beyond the map's memory)
         * and give +0.0 */
        const float *at =
            (const float *)((uintptr_t)src + (intptr_t)(x0 + j) * 4);
        _mm256_storeu_pd(row + j, _mm256_cvtps_pd(_mm_maskload_ps(at, in)));
      }
    }
  }
  for (int i = 0; i < 21; i++) {
    int y = cy - 10 + i;
    const double *row = rows[i];
    pump(next, 4);
    if (y < 0 || y >= h) {
      for (int v = 0; v < 3; v++) t[i][v] = _mm256_setzero_pd();
      continue;
    }
    for (int v = 0; v < 3; v++) {
      __m256d acc = _mm256_mul_pd(kv[0], _mm256_loadu_pd(row + 4 * v));
      if (variant & 1)
        for (int j = 1; j < 11; j++)
          acc = _mm256_fmadd_pd(kv[j], _mm256_loadu_pd(row + 4 * v + j), acc);
      else
        for (int j = 1; j < 11; j++)
          acc = _mm256_add_pd(acc, _mm256_mul_pd(
              kv[j], _mm256_loadu_pd(row + 4 * v + j)));
      t[i][v] = acc;
    }
  }
  const __m256d zero = _mm256_setzero_pd();
  double out[11][12];
  __m128 best = _mm_set1_ps(-INFINITY);
  for (int y = 0; y < 11; y++) {
    pump(next, 4);
    for (int v = 0; v < 3; v++) {
      __m256d acc = _mm256_add_pd(_mm256_mul_pd(kv[5], t[y + 5][v]), zero);
      for (int j = 1; j <= 5; j++) {
        __m256d pair = _mm256_add_pd(t[y + 5 + j][v], t[y + 5 - j][v]);
        acc = (variant & 2) ? _mm256_fmadd_pd(kv[5 + j], pair, acc)
                            : _mm256_add_pd(acc, _mm256_mul_pd(kv[5 + j], pair));
      }
      _mm256_storeu_pd(out[y] + 4 * v, acc);
      __m128 f = _mm256_cvtpd_ps(acc);
      if (v == 2)  /* column 11 is not in the region */
        f = _mm_blend_ps(f, _mm_set1_ps(-INFINITY), 8);
      best = _mm_max_ps(f, best);
    }
  }
  float m;
  if (cy >= 5 && cy + 5 < h && cx >= 5 && cx + 5 < w) {
    best = _mm_max_ps(best, _mm_movehl_ps(best, best));
    best = _mm_max_ss(best, _mm_shuffle_ps(best, best, 1));
    m = _mm_cvtss_f32(best);
  } else {  /* only the pixels in the map */
    m = -INFINITY;
    for (int i = 0; i < 11; i++) {
      int y = cy - 5 + i;
      if (y < 0 || y >= h) continue;
      for (int j = 0; j < 11; j++) {
        int x = cx - 5 + j;
        if (x < 0 || x >= w) continue;
        float v = (float)out[i][j];
        if (v > m) m = v;
      }
    }
  }
  if (stencil)
    for (int i = 0; i < 5; i++)
      for (int j = 0; j < 5; j++) stencil[i * 5 + j] = (float)out[3 + i][3 + j];
  return m;
}

/* outside_max for w a multiple of 8 (maps without NaN): each row's maximum
 * outside the boxes eight columns at a time (the scalar loop's compare and
 * branch per pixel was ~7% of dark_maps), then the first row holding the
 * largest and the first pixel outside the boxes holding it there, where
 * outside_max takes the first strictly larger one: the same position (a
 * maximum of +0.0 and -0.0 may come back with the other sign, which no
 * caller tells apart: they take max(value, 0)). */
__attribute__((target("avx2,fma"))) static float outside_max_avx2(
    const float *map, int h, int w, const float *rowmax, const int *ys,
    const int *xs, int boxes, int core, long *where) {
  const __m256 minus = _mm256_set1_ps(-INFINITY);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  float best = -INFINITY;
  int at_y = -1;
  for (int y = 0; y < h; y++) {
    __m256i lo[2], hi[2];  /* box columns as lo < col < hi */
    int n = 0;
    for (int b = 0; b < boxes; b++)
      if (abs(y - ys[b]) <= core) {
        lo[n] = _mm256_set1_epi32(xs[b] - core - 1);
        hi[n] = _mm256_set1_epi32(xs[b] + core + 1);
        n++;
      }
    float m = rowmax[y];
    if (n) {
      const float *row = map + (long)y * w;
      __m256 acc = minus;
      for (int x = 0; x < w; x += 8) {
        __m256 v = _mm256_loadu_ps(row + x);
        __m256i col = _mm256_add_epi32(lane, _mm256_set1_epi32(x));
        for (int b = 0; b < n; b++) {
          __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(col, lo[b]),
                                        _mm256_cmpgt_epi32(hi[b], col));
          v = _mm256_blendv_ps(v, minus, _mm256_castsi256_ps(in));
        }
        acc = _mm256_max_ps(v, acc);
      }
      __m128 half = _mm_max_ps(_mm256_castps256_ps128(acc),
                               _mm256_extractf128_ps(acc, 1));
      half = _mm_max_ps(half, _mm_movehl_ps(half, half));
      half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
      m = _mm_cvtss_f32(half);
    }
    if (m > best) {
      best = m;
      at_y = y;
    }
  }
  if (where) {
    *where = -1;
    for (int x = 0; at_y >= 0 && x < w; x++) {
      int boxed = 0;
      for (int b = 0; b < boxes; b++)
        boxed |= abs(at_y - ys[b]) <= core && abs(x - xs[b]) <= core;
      if (!boxed && map[(long)at_y * w + x] == best) {
        *where = (long)at_y * w + x;
        break;
      }
    }
  }
  return best;
}

/* max(init, v[from], ..., v[to - 1]) of values that are not NaN (the row
 * maxima), eight at a time: the scalar loop is a chain of dependent
 * maxima, ~4 cycles a row. */
__attribute__((target("avx2,fma"))) static float rows_max_avx2(
    const float *v, int from, int to, float init) {
  __m256 best = _mm256_set1_ps(init);
  int y = from;
  for (; y + 8 <= to; y += 8) best = _mm256_max_ps(_mm256_loadu_ps(v + y), best);
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(best),
                           _mm256_extractf128_ps(best, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
  float m = _mm_cvtss_f32(half);
  for (; y < to; y++) m = v[y] > m ? v[y] : m;
  return m;
}

/* The largest value of the rows cy - core .. cy + core outside the columns
 * cx - core .. cx + core, those in the map (w a multiple of 8). */
__attribute__((target("avx2,fma"))) static float core_rows_rest(
    const float *map, int h, int w, int cy, int cx, int core) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  const __m256 minus = _mm256_set1_ps(-INFINITY);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int y = cy - core; y <= cy + core; y++) {
    if (y < 0 || y >= h) continue;  /* padding: 0, and rest >= 0 anyway */
    const float *row = map + (long)y * w;
    for (int x = 0; x < w; x += 8) {
      __m256 v = _mm256_loadu_ps(row + x);
      if (x + 7 >= cx - core && x <= cx + core) {
        __m256i col = _mm256_add_epi32(lane, _mm256_set1_epi32(x - cx));
        __m256i in = _mm256_and_si256(
            _mm256_cmpgt_epi32(col, _mm256_set1_epi32(-core - 1)),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(core + 1), col));
        v = _mm256_blendv_ps(v, minus, _mm256_castsi256_ps(in));
      }
      best = _mm256_max_ps(v, best);
    }
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, best);
  float m = lanes[0];
  for (int j = 1; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
  return m;
}

/* whole_blur for kernel 11 and w a multiple of 4, in AVX2 (the same
 * operations per pixel as blur_rect; rows of the padding blur to +0.0 as
 * OpenCV's do). */
__attribute__((target("avx2,fma"))) static float whole_blur_11(
    const float *map, int h, int w, const double *k, int variant,
    double *work) {
  __m256d kv[11];
  for (int j = 0; j < 11; j++) kv[j] = _mm256_set1_pd(k[j]);
  /* The map in float64 rows with 5 zeros each side, all converted before
   * the row pass (see region_blur_11_5). */
  long stride = w + 10;
  double *canvas = work, *tmp = work + (long)h * stride;
  for (int y = 0; y < h; y++) {
    double *buf = canvas + (long)y * stride;
    const float *src = map + (long)y * w;
    for (int j = 0; j < 5; j++) buf[j] = buf[w + 5 + j] = 0.0;
    for (int x = 0; x < w; x += 4)
      _mm256_storeu_pd(buf + 5 + x, _mm256_cvtps_pd(_mm_loadu_ps(src + x)));
  }
  memset(tmp, 0, sizeof(double) * 5 * w);
  memset(tmp + (long)(h + 5) * w, 0, sizeof(double) * 5 * w);
  for (int y = 0; y < h; y++) {
    const double *buf = canvas + (long)y * stride;
    double *dst = tmp + (long)(y + 5) * w;
    for (int x = 0; x < w; x += 4) {
      __m256d acc = _mm256_mul_pd(kv[0], _mm256_loadu_pd(buf + x));
      if (variant & 1)
        for (int j = 1; j < 11; j++)
          acc = _mm256_fmadd_pd(kv[j], _mm256_loadu_pd(buf + x + j), acc);
      else
        for (int j = 1; j < 11; j++)
          acc = _mm256_add_pd(acc, _mm256_mul_pd(kv[j],
                                                 _mm256_loadu_pd(buf + x + j)));
      _mm256_storeu_pd(dst + x, acc);
    }
  }
  const __m256d zero = _mm256_setzero_pd();
  __m128 best = _mm_set1_ps(-INFINITY);
  for (int y = 0; y < h; y++) {
    const double *mid = tmp + (long)(y + 5) * w;
    for (int x = 0; x < w; x += 4) {
      __m256d acc = _mm256_add_pd(_mm256_mul_pd(kv[5], _mm256_loadu_pd(mid + x)),
                                  zero);
      for (int j = 1; j <= 5; j++) {
        __m256d pair = _mm256_add_pd(_mm256_loadu_pd(mid + (long)j * w + x),
                                     _mm256_loadu_pd(mid - (long)j * w + x));
        acc = (variant & 2) ? _mm256_fmadd_pd(kv[5 + j], pair, acc)
                            : _mm256_add_pd(acc, _mm256_mul_pd(kv[5 + j], pair));
      }
      best = _mm_max_ps(_mm256_cvtpd_ps(acc), best);
    }
  }
  best = _mm_max_ps(best, _mm_movehl_ps(best, best));
  best = _mm_max_ss(best, _mm_shuffle_ps(best, best, 1));
  return _mm_cvtss_f32(best);
}
#endif

/* Whether dark_maps can take a map's maximum from `peak_statistics` (the
 * device's, decode.py): index -1 (the map holds a NaN or an infinity: the
 * Python path), or an index in the map whose value is a normal float > 0
 * (the device compared the values' bits as integers, which orders those as
 * numpy does; a maximum <= 0 or below FLT_MIN goes the scanning way, as
 * without statistics), above `outside` (a float in [0, inf); a tie outside
 * the core box could be an earlier maximum) and the first maximum of its
 * core box, and, with a window, the window's centre (bit for bit) and core
 * box are the map's there: statistics of other maps or of another layout
 * show here. Anything else: the map is scanned as without statistics. */
static inline int given_peak_usable(const float *map, int h, int w, int core,
                                    int32_t index, int32_t outside,
                                    const float *window) {
  if (index < 0) return index == -1;
  if ((long)index >= (long)h * w) return 0;
  if (outside < 0 || outside >= 0x7f800000) return 0;
  float peak = map[index], rest;
  memcpy(&rest, &outside, 4);
  if (!(peak >= 1.17549435e-38f && peak < INFINITY && rest < peak)) return 0;
  int cy = index / w, cx = index % w;
  if (window && (core > 10 || memcmp(&peak, window + 10 * WINDOW_COLS + 10, 4)))
    return 0;
  for (int y = cy - core; y <= cy + core; y++) {
    if (y < 0 || y >= h) continue;
    for (int x = cx - core; x <= cx + core; x++) {
      if (x < 0 || x >= w) continue;
      float v = window ? window[(y - cy + 10) * WINDOW_COLS + x - cx + 10]
                       : map[(long)y * w + x];
      if (!(v < peak || (v == peak && (long)y * w + x >= index))) return 0;
    }
  }
  return 1;
}

/* Whether the device's second maximum can stand for the scan's (its value
 * `raw` a normal float > 0 (the first maximum's FIRST_REST): there the
 * device's first maximum outside the box, compared as integers, is
 * outside_max's), outside the first core box, with the window's centre
 * (bit for bit) and a SECOND_REST in [0, raw]. */
static inline int given_second_usable(int h, int w, int core, int cy, int cx,
                                      float raw, const int32_t *stat,
                                      const float *window) {
  int32_t second = stat[SECOND], beyond = stat[SECOND_REST], bits;
  if (!(raw >= 1.17549435e-38f && raw < INFINITY)) return 0;
  if (second < 0 || (long)second >= (long)h * w) return 0;
  int sy = second / w, sx = second % w;
  if (abs(sy - cy) <= core && abs(sx - cx) <= core) return 0;
  memcpy(&bits, &raw, 4);
  if (memcmp(&bits, window + 10 * WINDOW_COLS + 10, 4)) return 0;
  return beyond >= 0 && beyond <= bits;
}

/* Prefetches of the next map's rows within `reach` of its maximum (what
 * its first region reads), spread over this map's work by pump(). */
static inline void next_region(struct ahead *next, const float *map,
                               int32_t index, int h, int w, int reach) {
  next->at = next->end = NULL;
  if (map == NULL || index < 0 || (long)index >= (long)h * w) return;
  int cy = index / w;
  int y0 = cy - reach > 0 ? cy - reach : 0;
  int y1 = cy + reach + 1 < h ? cy + reach + 1 : h;
  next->at = (const char *)(map + (long)y0 * w);
  next->end = (const char *)(map + (long)y1 * w);
}

static inline double beyond_bound(double rest, const double *peaks, int n,
                                  double total, double weight) {
  double bound = rest * total;
  for (int i = 0; i < n; i++) {
    double excess = peaks[i] - rest;
    bound = bound + (excess > 0.0 ? excess : 0.0) * weight;
  }
  return bound * (1 + 1e-9);
}

/* Column `col` of the [25, stride] stencils for the log: the map's 5x5
 * blurred values times maxval / blur_max, at least 1e-10 (NaN kept), in
 * float32 as decode._refine computes `np.maximum(stencil * ratio, 1e-10)`
 * (the Python float 1e-10 rounded to float32, as numpy does). */
static inline void scaled_column(const float *stencil, float maxval,
                                 float blur_max, float *scaled, long stride,
                                 long col) {
  const float ratio = maxval / blur_max;
  const float floor = (float)1e-10;
  for (int r = 0; r < 25; r++) {
    float v = stencil[r] * ratio;
    scaled[r * stride + col] = (v > floor || v != v) ? v : floor;
  }
}

/* Everything `decode._dark` needs from the blur, for m maps [m, h, w]
 * (peak_stats [m, 4], first_windows and second_windows [m, WINDOW]: NULL,
 * or the device's `peak_statistics` of the maps). Outputs per map: status
 * (see the enum), coords[2] (x, y of the first maximum, float32; 0 for
 * PYTHON) and maxval; for the refined maps, in map
 * order, their index (refined) and their stencil for the log (scaled, a
 * [25, m] array: column j for refined[j]); count: how many. Returns the
 * number of maps blurred whole. */
static inline __attribute__((always_inline)) long dark_maps_impl(
    const float *maps, long m, int h, int w, const double *k,
    int ksize, int region, int core, double total, double weight,
    int variant, const int32_t *peak_stats, const float *first_windows,
    const float *second_windows, double *work, int8_t *status, float *coords,
    float *maxval, int64_t *refined, float *scaled, int64_t *count,
    int vector) {
  long whole = 0, done = 0;
  float stencil[25];
  struct ahead next = {(const char *)maps, (const char *)maps};
  float rowmax[4096];
  int radius = (ksize - 1) / 2;
  int usable = ksize % 2 == 1 && radius <= MAX_RADIUS && region >= 2 &&
               region <= MAX_REGION && h <= 4096 && w <= MAX_WIDTH &&
               h > 2 * core + 1 && w > 2 * core + 1;
  /* the device's windows: for the AVX2 blur of kernel 11, region 5 */
  int windows = vector && ksize == 11 && region == 5 && w % 8 == 0 &&
                first_windows != NULL && second_windows != NULL;
  if (peak_stats != NULL && m > 0 && !windows)
    next_region(&next, maps, peak_stats[FIRST], h, w, region + radius);
  for (long i = 0; i < m; i++) {
    const float *map = maps + i * (long)h * w;
    status[i] = PYTHON;
    coords[2 * i] = coords[2 * i + 1] = 0.0f;
    if (!usable) continue;
    const char *following = (const char *)(map + (long)h * w);
    float peak;
    int cy = 0, cx = 0;
    const int32_t *stat = peak_stats ? peak_stats + 4 * i : NULL;
    const float *window = windows ? first_windows + i * WINDOW : NULL;
    if (windows && i + 2 < m) {
      /* Two maps ahead: the first window (sequential, but the hardware's
       * prefetcher stops at page boundaries) and the maximum's line. Timed
       * on the benchmark's maps out of the caches: clearly faster than
       * none; one map ahead the same; with the second windows as well,
       * slower than without them (their bytes, seldom read). */
      const char *ahead = (const char *)(first_windows + (i + 2) * WINDOW);
      for (int at = 0; at < (int)sizeof(float) * WINDOW; at += 64)
        __builtin_prefetch(ahead + at, 0, 3);
      int32_t top = peak_stats[4 * (i + 2) + FIRST];
      if (top >= 0 && (long)top < (long)h * w)
        __builtin_prefetch(maps + (i + 2) * (long)h * w + top, 0, 3);
    }
    /* rows_known: rowmax holds this map's row maxima (scanned) */
    int rows_known = stat == NULL || !given_peak_usable(
        map, h, w, core, stat[FIRST], stat[FIRST_REST], window);
    if (rows_known) window = NULL;  /* statistics unused: the map is read */
    if (!rows_known) {
      if (stat[FIRST] < 0) continue;  /* NaN / inf: Python */
      /* The next map's lines around its maximum (the region's rows). */
      if (window)
        next.at = next.end = NULL;  /* prefetched above */
      else
        next_region(&next, i + 1 < m ? (const float *)following : NULL,
                    i + 1 < m ? stat[4 + FIRST] : -1, h, w, region + radius);
      cy = stat[FIRST] / w;
      cx = stat[FIRST] % w;
      peak = map[stat[FIRST]];
    } else {
      /* The next map's lines; those this map's work leaves (maps that stop
       * early) its own scan loads. */
      if (next.at < following) next.at = following;
      next.end = i + 1 < m ? following + sizeof(float) * h * w : following;
      if ((vector ? scan_rows_avx2 : scan_rows)(map, h, w, rowmax, &next))
        continue;  /* NaN / inf */
      peak = rowmax[0];
#if defined(__x86_64__) || defined(__i386__)
      if (vector) {  /* the first row holding the maximum */
        peak = rows_max_avx2(rowmax, 1, h, peak);
        while (rowmax[cy] != peak) cy++;
      } else
#endif
        for (int y = 1; y < h; y++)
          if (rowmax[y] > peak) {
            peak = rowmax[y];
            cy = y;
          }
      if (!(peak > 0)) continue;  /* np.max's sign of a zero: Python */
      while (map[(long)cy * w + cx] != peak) cx++;
    }
    coords[2 * i] = (float)cx;
    coords[2 * i + 1] = (float)cy;
    maxval[i] = peak;
    if (cx <= 1 || cx >= w - 2 || cy <= 1 || cy >= h - 2) {
      status[i] = BORDER;
      continue;
    }
    int ys[2] = {cy, 0}, xs[2] = {cx, 0};
    /* The first region (from the device's window, if any) and the largest
     * value outside the core box (the device's, or from the rows). */
    int blur_11_5 = vector && ksize == 11 && region == 5 && w % 8 == 0;
    float best, raw;
#if defined(__x86_64__) || defined(__i386__)
    if (blur_11_5)
      best = region_blur_11_5(map, h, w, cy, cx, k, variant, stencil, &next,
                              window);
    else
#endif
      best = region_blur(map, h, w, cy, cx, region, k, ksize, variant,
                         stencil);
    if (!rows_known)
      memcpy(&raw, &stat[FIRST_REST], 4);
#if defined(__x86_64__) || defined(__i386__)
    else if (blur_11_5) {
      raw = core_rows_rest(map, h, w, cy, cx, core);
      raw = rows_max_avx2(rowmax, 0, cy - core > 0 ? cy - core : 0, raw);
      raw = rows_max_avx2(rowmax, cy + core + 1 < h ? cy + core + 1 : h, h,
                          raw);
    }
#endif
    else
      raw = outside_max(map, h, w, rowmax, ys, xs, 1, core, NULL);
    double rest = raw > 0 ? (double)raw : 0.0;
    double peaks[2] = {(double)peak, (double)raw};
    double bound = beyond_bound(rest, peaks, 1, total, weight);
    if (bound < (double)nextafterf(best, -INFINITY)) {
      status[i] = REFINED;
      refined[done] = i;
      scaled_column(stencil, peak, best, scaled, m, done++);
      continue;
    }
    /* The second region, around the first occurrence of that value, and
     * the largest value beyond both boxes: the device's (with its window),
     * or from every row's maximum. */
    const float *window2 = NULL;
    float raw2 = 0.0f;
    int has_second = 0;
#if defined(__x86_64__) || defined(__i386__)
    if (window &&
        given_second_usable(h, w, core, cy, cx, raw, stat,
                            second_windows + i * WINDOW)) {
      window2 = second_windows + i * WINDOW;
      ys[1] = stat[SECOND] / w;
      xs[1] = stat[SECOND] % w;
      memcpy(&raw2, &stat[SECOND_REST], 4);
      has_second = 1;
    } else
#endif
    {
      if (!rows_known &&
          (vector ? scan_rows_avx2 : scan_rows)(map, h, w, rowmax, &next)) {
        status[i] = PYTHON;  /* not the device's maps: never with its peaks */
        coords[2 * i] = coords[2 * i + 1] = 0.0f;
        continue;
      }
      long second;
#if defined(__x86_64__) || defined(__i386__)
      if (vector && w % 8 == 0)
        outside_max_avx2(map, h, w, rowmax, ys, xs, 1, core, &second);
      else
#endif
        outside_max(map, h, w, rowmax, ys, xs, 1, core, &second);
      if (second >= 0) {
        ys[1] = (int)(second / w);
        xs[1] = (int)(second % w);
#if defined(__x86_64__) || defined(__i386__)
        if (vector && w % 8 == 0)
          raw2 = outside_max_avx2(map, h, w, rowmax, ys, xs, 2, core, NULL);
        else
#endif
          raw2 = outside_max(map, h, w, rowmax, ys, xs, 2, core, NULL);
        has_second = 1;
      }
    }
    if (has_second) {
      float best2;
#if defined(__x86_64__) || defined(__i386__)
      if (vector && ksize == 11 && region == 5)
        best2 = region_blur_11_5(map, h, w, ys[1], xs[1], k, variant, NULL,
                                 &next, window2);
      else
#endif
        best2 = region_blur(map, h, w, ys[1], xs[1], region, k, ksize,
                            variant, NULL);
      if (best2 > best) best = best2;
      rest = raw2 > 0 ? (double)raw2 : 0.0;
      bound = beyond_bound(rest, peaks, 2, total, weight);
      if (bound < (double)nextafterf(best, -INFINITY)) {
        status[i] = REFINED;
        refined[done] = i;
        scaled_column(stencil, peak, best, scaled, m, done++);
        continue;
      }
    }
#if defined(__x86_64__) || defined(__i386__)
    if (vector && ksize == 11 && w % 4 == 0)
      best = whole_blur_11(map, h, w, k, variant, work);
    else
#endif
      best = whole_blur(map, h, w, k, ksize, variant, work);
    status[i] = REFINED_WHOLE;
    refined[done] = i;
    scaled_column(stencil, peak, best, scaled, m, done++);
    whole++;
  }
  *count = done;
  return whole;
}

/* The exported functions: an AVX2 + FMA build of each (vector fused
 * multiply-adds, the same roundings as fma()) where the CPU has them, the
 * baseline one elsewhere. */
#define DARK_BLUR_ARGS                                                        \
  const double *canvas, int stride, int rows, int cols, const double *k,      \
      int ksize, int variant, double *tmp, double *out
#define DARK_BLUR_CALL canvas, stride, rows, cols, k, ksize, variant, tmp, out
#define DARK_MAPS_ARGS                                                        \
  const float *maps, long m, int h, int w, const double *k, int ksize,        \
      int region, int core, double total, double weight, int variant,         \
      const int32_t *peak_stats, const float *first_windows,                  \
      const float *second_windows, double *work, int8_t *status,              \
      float *coords, float *maxval, int64_t *refined, float *scaled,          \
      int64_t *count
#define DARK_MAPS_CALL                                                        \
  maps, m, h, w, k, ksize, region, core, total, weight, variant,              \
      peak_stats, first_windows, second_windows, work, status, coords,        \
      maxval, refined, scaled, count

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static void blur_fma(DARK_BLUR_ARGS) {
  blur_impl(DARK_BLUR_CALL);
}
__attribute__((target("avx2,fma"))) static long maps_fma(DARK_MAPS_ARGS) {
  if (ksize == 11 && region == 5 && variant == 1)  /* constant sizes */
    return dark_maps_impl(maps, m, h, w, k, 11, 5, core, total, weight, 1,
                          peak_stats, first_windows, second_windows, work,
                          status, coords, maxval, refined, scaled, count, 1);
  return dark_maps_impl(DARK_MAPS_CALL, 1);
}
static int plain_only = 0;  /* dark_set_plain: tests of the plain build */
static int has_fma(void) {
  __builtin_cpu_init();
  return !plain_only && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}
void dark_set_plain(int plain) { plain_only = plain; }
#else
static void blur_fma(DARK_BLUR_ARGS) { blur_impl(DARK_BLUR_CALL); }
static long maps_fma(DARK_MAPS_ARGS) { return dark_maps_impl(DARK_MAPS_CALL, 0); }
static int has_fma(void) { return 0; }
void dark_set_plain(int plain) { (void)plain; }
#endif

static void blur_plain(DARK_BLUR_ARGS) { blur_impl(DARK_BLUR_CALL); }
static long maps_plain(DARK_MAPS_ARGS) {
  return dark_maps_impl(DARK_MAPS_CALL, 0);
}

/* Blurs the interior (rows, cols) of a zero-padded float64 canvas: the
 * self-check's entry point (compared with cv2.GaussianBlur). `tmp` holds
 * (rows + ksize - 1) * cols doubles. */
void dark_blur(DARK_BLUR_ARGS) {
  if (has_fma())
    blur_fma(DARK_BLUR_CALL);
  else
    blur_plain(DARK_BLUR_CALL);
}

/* Everything `decode._dark` needs from the blur (see dark_maps_impl). */
long dark_maps(DARK_MAPS_ARGS) {
  return has_fma() ? maps_fma(DARK_MAPS_CALL) : maps_plain(DARK_MAPS_CALL);
}

/* The Newton step of decode._newton_offsets from the log-stencils [25, s]
 * (row (2 + dy) * 5 + 2 + dx: pixel (dy, dx) of every map; rows `stride`
 * floats apart, so that dark_maps' `scaled` serves in place): the float32
 * derivatives in numpy's order, the float64 inverse of
 * decode._lu_inverse_2x2 cast to float32, and the offset -(inverse @
 * gradient) in float32 as numpy's matmul rounds it (0 + two products);
 * usable: det != 0 and both pivots non-zero. Returns 0, or 1 when a Hessian
 * is not finite (then decode uses numpy for all). */
int dark_newton(const float *log_stencil, long s, long stride, float *offset,
                int8_t *usable) {
  int special = 0;
  for (long i = 0; i < s; i++) {
#define AT(dy, dx) log_stencil[(long)((2 + (dy)) * 5 + 2 + (dx)) * stride + i]
    float dx = 0.5f * (AT(0, 1) - AT(0, -1));
    float dy = 0.5f * (AT(1, 0) - AT(-1, 0));
    float dxx = 0.25f * (AT(0, 2) - 2.0f * AT(0, 0) + AT(0, -2));
    float dxy = 0.25f * (AT(1, 1) - AT(-1, 1) - AT(1, -1) + AT(-1, -1));
    float dyy = 0.25f * (AT(2, 0) - 2.0f * AT(0, 0) + AT(-2, 0));
#undef AT
    float det = dxx * dyy - dxy * dxy;
    if (!(isfinite(dxx) && isfinite(dxy) && isfinite(dyy))) special = 1;
    double a = dxx, b = dxy, c = dxy, d = dyy;
    int swap = fabs(c) > fabs(a);
    double u00 = swap ? c : a, other = swap ? a : c;
    double u01 = swap ? d : b, other1 = swap ? b : d;
    double low = other * (1 / u00);
    double u11 = other1 - low * u01;
    float inverse[2][2];
    for (int col = 0; col < 2; col++) {
      double b0 = swap ? (double)(col == 1) : (double)(col == 0);
      double b1 = (swap ? (double)(col == 0) : (double)(col == 1)) - low * b0;
      double x1 = b1 * (1 / u11);
      double x0 = (b0 - u01 * x1) * (1 / u00);
      inverse[0][col] = (float)x0;
      inverse[1][col] = (float)x1;
    }
    for (int row = 0; row < 2; row++) {  /* numpy's matmul loop: from 0 */
      float acc = 0.0f;
      acc += inverse[row][0] * dx;
      acc += inverse[row][1] * dy;
      offset[2 * i + row] = -acc;
    }
    usable[i] = det != 0 && u00 != 0 && u11 != 0;
  }
  return special;
}

/* dark_newton, then coords[refined[i]] += offset[i] (float32, as decode's
 * `coords[sel[done]] += offset`) for the usable maxima i; nothing moves when
 * it returns 1 (a Hessian not finite: decode uses numpy for all). offset and
 * usable: scratch for s maxima. */
int dark_newton_move(const float *log_stencil, long s, long stride,
                     const int64_t *refined, float *coords, float *offset,
                     int8_t *usable) {
  if (dark_newton(log_stencil, s, stride, offset, usable)) return 1;
  for (long i = 0; i < s; i++)
    if (usable[i]) {
      coords[2 * refined[i]] += offset[2 * i];
      coords[2 * refined[i] + 1] += offset[2 * i + 1];
    }
  return 0;
}
