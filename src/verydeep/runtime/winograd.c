/* Winograd minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016) for a stride-1, pad-1 3x3
 * convolution with bias and optional ReLU, on NHWC float32 activations.
 *
 * Each thread takes blocks of T >= 2 output tiles (alpha = m + 2 inputs square each). For a block
 * it writes the transformed inputs V[a][t][c] = (B^T d B)[a] into its own workspace, multiplies
 * each of the alpha^2 slices by the pre-transformed weights U[a] (C x K) with BLAS sgemm, and
 * turns the products M[a][t][k] into m x m outputs (A^T M A) plus bias and ReLU, written
 * straight to y. Fusing the three phases per block is what makes the transforms cheap: the
 * alpha^2 / m^2 times larger transformed data never goes to memory. Sums are float32 in the
 * order written; the build must not reassociate them (no -ffast-math).
 */
#include <omp.h>
#include <string.h>

/* BLAS sgemm (column-major), exported by libtorch_cpu: MKL on x86 builds of PyTorch. */
void sgemm_(const char *, const char *, const int *, const int *, const int *, const float *, const float *,
            const int *, const float *, const int *, const float *, float *, const int *);

/* Row-major out (rows x K) = v (rows x C) . u (C x K): column-major out^T = u^T . v^T. */
static void gemm(int rows, int K, int C, const float *v, const float *u, float *out) {
    const float one = 1.0f, zero = 0.0f;
    sgemm_("N", "N", &K, &rows, &C, &one, u, &K, v, &C, &zero, out, &K);
}

#define CB 16 /* channels transformed at a time: one AVX-512 register, two AVX2 ones */
typedef float vf __attribute__((vector_size(CB * sizeof(float)), aligned(4)));
typedef int vi __attribute__((vector_size(CB * sizeof(int)), aligned(4)));

/* The 1-D transforms, written out: out = B^T in (alpha values) and out = A^T in (m values). */
static inline void bt2(const vf *d, vf *o) {
    o[0] = d[0] - d[2], o[1] = d[1] + d[2], o[2] = d[2] - d[1], o[3] = d[1] - d[3];
}
static inline void at2(const vf *d, vf *o) { o[0] = d[0] + d[1] + d[2], o[1] = d[1] - d[2] - d[3]; }
static inline void bt4(const vf *d, vf *o) {
    o[0] = 4 * d[0] - 5 * d[2] + d[4];
    o[1] = d[3] + d[4] - 4 * (d[1] + d[2]);
    o[2] = d[4] - d[3] + 4 * (d[1] - d[2]);
    o[3] = d[4] - d[2] + 2 * (d[3] - d[1]);
    o[4] = d[4] - d[2] + 2 * (d[1] - d[3]);
    o[5] = 4 * d[1] - 5 * d[3] + d[5];
}
static inline void at4(const vf *d, vf *o) {
    const vf s12 = d[1] + d[2], d12 = d[1] - d[2], s34 = d[3] + d[4], d34 = d[3] - d[4];
    o[0] = d[0] + s12 + s34, o[1] = d12 + 2 * d34, o[2] = s12 + 4 * s34, o[3] = d12 + 8 * d34 + d[5];
}

/* One tile's input transform for CB channels: v[a*A+b] = (B^T d B)[a][b], zero outside the image. */
#define INPUT_TRANSFORM(A, BT)                                                                          \
    static void input_tile_##A(const float *x, int H, int W, int C, int n, int r0, int s0, int c0,     \
                               float *v, long vstride) {                                                \
        vf d[A][A], col[A], t[A][A], row[A], o[A];                                                       \
        const vf zero = {0};                                                                             \
        for (int r = 0; r < A; r++)                                                                      \
            for (int s = 0; s < A; s++) {                                                                \
                int h = r0 + r, w = s0 + s;                                                              \
                if (h < 0 || h >= H || w < 0 || w >= W)                                                  \
                    d[r][s] = zero;                                                                      \
                else                                                                                     \
                    d[r][s] = *(const vf *)(x + (((long)n * H + h) * W + w) * C + c0);                   \
            }                                                                                            \
        for (int s = 0; s < A; s++) {                                                                    \
            for (int r = 0; r < A; r++) col[r] = d[r][s];                                                \
            BT(col, o);                                                                                  \
            for (int a = 0; a < A; a++) t[a][s] = o[a];                                                  \
        }                                                                                                \
        for (int a = 0; a < A; a++) {                                                                    \
            for (int s = 0; s < A; s++) row[s] = t[a][s];                                                \
            BT(row, o);                                                                                  \
            for (int b = 0; b < A; b++) *(vf *)(v + (a * A + b) * vstride) = o[b];                       \
        }                                                                                                \
    }

/* One tile's output transform for CB channels: y = A^T M A + bias, ReLU'd, cropped to H x W. */
#define OUTPUT_TRANSFORM(A, MM, AT)                                                                     \
    static void output_tile_##A(const float *mm, long mstride, const float *bias, int relu, float *y,   \
                                int H, int W, int K, int n, int p0, int q0, int k0) {                   \
        vf col[A], t[MM][A], row[A], o[MM];                                                              \
        const vf b0 = *(const vf *)(bias + k0), zero = {0};                                              \
        for (int b = 0; b < A; b++) {                                                                    \
            for (int a = 0; a < A; a++) col[a] = *(const vf *)(mm + (a * A + b) * mstride);              \
            AT(col, o);                                                                                  \
            for (int p = 0; p < MM; p++) t[p][b] = o[p];                                                 \
        }                                                                                                \
        for (int p = 0; p < MM && p0 + p < H; p++) {                                                     \
            for (int b = 0; b < A; b++) row[b] = t[p][b];                                                \
            AT(row, o);                                                                                  \
            for (int q = 0; q < MM && q0 + q < W; q++) {                                                 \
                vf out = o[q] + b0;                                                                      \
                if (relu) out = (vf)((vi)out & ~(out < zero));                                          \
                *(vf *)(y + (((long)n * H + p0 + p) * W + q0 + q) * K + k0) = out;                       \
            }                                                                                            \
        }                                                                                                \
    }

INPUT_TRANSFORM(4, bt2)
INPUT_TRANSFORM(6, bt4)
OUTPUT_TRANSFORM(4, 2, at2)
OUTPUT_TRANSFORM(6, 4, at4)

/* y (N x H x W x K) = relu?(conv3x3(x (N x H x W x C), w) + bias), pad 1, with w given as
 * U = G w G^T laid out [alpha^2][C][K]. C and K must be multiples of CB. Blocks of T tiles;
 * work holds threads * alpha^2 * T * (C + K) floats (each thread's V and M). Returns 0, or -1
 * for arguments the kernel does not take. */
int verydeep_winograd(const float *x, int N, int H, int W, int C, const float *U, int K, const float *bias,
                      int relu, float *y, int m, int T, int threads, float *work) {
    if ((m != 2 && m != 4) || C % CB || K % CB || T < 2 || threads < 1) return -1;
    const int A = m + 2, AA = A * A;
    const int th = (H + m - 1) / m, tw = (W + m - 1) / m;
    const long tiles = (long)N * th * tw, blocks = (tiles + T - 1) / T;
#pragma omp parallel num_threads(threads)
    {
        float *v = work + (long)omp_get_thread_num() * AA * T * (C + K);
        float *mm = v + (long)AA * T * C;
#pragma omp for schedule(dynamic, 1)
        for (long blk = 0; blk < blocks; blk++) {
            const long t0 = blk * T;
            const int nt = (int)(tiles - t0 < T ? tiles - t0 : T);
            for (int t = 0; t < nt; t++) {
                const long tile = t0 + t;
                const int n = (int)(tile / ((long)th * tw)), i = (int)(tile / tw % th), j = (int)(tile % tw);
                for (int c0 = 0; c0 < C; c0 += CB) {
                    if (m == 2)
                        input_tile_4(x, H, W, C, n, i * m - 1, j * m - 1, c0, v + (long)t * C + c0, (long)T * C);
                    else
                        input_tile_6(x, H, W, C, n, i * m - 1, j * m - 1, c0, v + (long)t * C + c0, (long)T * C);
                }
            }
            /* A one-row GEMM would go down BLAS's matrix-vector path, which sums in another order:
             * a zero second row keeps every tile's result the same bits whatever its block. */
            const int rows = nt > 1 ? nt : 2;
            if (nt == 1)
                for (int a = 0; a < AA; a++) memset(v + (long)a * T * C + C, 0, sizeof(float) * C);
            for (int a = 0; a < AA; a++)
                gemm(rows, K, C, v + (long)a * T * C, U + (long)a * C * K, mm + (long)a * T * K);
            for (int t = 0; t < nt; t++) {
                const long tile = t0 + t;
                const int n = (int)(tile / ((long)th * tw)), i = (int)(tile / tw % th), j = (int)(tile % tw);
                for (int k0 = 0; k0 < K; k0 += CB) {
                    if (m == 2)
                        output_tile_4(mm + (long)t * K + k0, (long)T * K, bias, relu, y, H, W, K, n, i * m, j * m, k0);
                    else
                        output_tile_6(mm + (long)t * K + k0, (long)T * K, bias, relu, y, H, W, K, n, i * m, j * m, k0);
                }
            }
        }
    }
    return 0;
}
