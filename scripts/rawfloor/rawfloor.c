/*
 * An independent check of the sweep's machine limit: the same work as one task's codec floor
 * (decode the source to RGB once, encode every crop box at quality 85, 4:2:0), timed from C
 * straight through libjpeg-turbo's TurboJPEG 3 API with reused handles and buffers, outside
 * cropfleet's code. Prints the median of REPS repetitions after one warm-up and the limit
 * cores / median, for comparison with the sweep's `limit_tasks_per_s`.
 *
 * Usage: rawfloor IMAGE.jpg CROPS.csv [REPS] [QUALITY]   (built by scripts/rawfloor.sh)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <turbojpeg.h>

static unsigned char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) { perror(path); exit(1); }
  fseek(f, 0, SEEK_END);
  *len = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *buf = malloc(*len + 1);
  if (fread(buf, 1, *len, f) != *len) { perror(path); exit(1); }
  buf[*len] = 0;
  fclose(f);
  return buf;
}

static double clock_ms(clockid_t id) {
  struct timespec t;
  clock_gettime(id, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

#define CHECK(h, call) do { if ((call) < 0) { fprintf(stderr, "%s: %s\n", #call, tj3GetErrorStr(h)); exit(1); } } while (0)

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s IMAGE.jpg CROPS.csv [REPS] [QUALITY]\n", argv[0]); return 2; }
  int reps = argc > 3 ? atoi(argv[3]) : 20, quality = argc > 4 ? atoi(argv[4]) : 85;
  size_t jlen, clen;
  unsigned char *jpeg = slurp(argv[1], &jlen);
  char *csv = (char *)slurp(argv[2], &clen);
  int boxes[4096][4], n = 0;
  for (char *line = strtok(csv, "\n"); line && n < 4096; line = strtok(NULL, "\n"))
    if (sscanf(line, "%d,%d,%d,%d", &boxes[n][0], &boxes[n][1], &boxes[n][2], &boxes[n][3]) == 4) n++;

  tjhandle d = tj3Init(TJINIT_DECOMPRESS), c = tj3Init(TJINIT_COMPRESS);
  CHECK(d, tj3DecompressHeader(d, jpeg, jlen));
  int w = tj3Get(d, TJPARAM_JPEGWIDTH), h = tj3Get(d, TJPARAM_JPEGHEIGHT);
  unsigned char *rgb = malloc((size_t)w * h * 3);
  CHECK(c, tj3Set(c, TJPARAM_QUALITY, quality));
  CHECK(c, tj3Set(c, TJPARAM_SUBSAMP, TJSAMP_420));
  CHECK(c, tj3Set(c, TJPARAM_NOREALLOC, 1));
  size_t cap = tj3JPEGBufSize(w, h, TJSAMP_420);
  unsigned char *out = malloc(cap);

  double *t = malloc(sizeof(double) * (reps + 1)), *cpu = malloc(sizeof(double) * (reps + 1));
  size_t bytes = 0;
  for (int r = 0; r <= reps; r++) {
    double t0 = clock_ms(CLOCK_MONOTONIC), c0 = clock_ms(CLOCK_THREAD_CPUTIME_ID);
    CHECK(d, tj3Decompress8(d, jpeg, jlen, rgb, w * 3, TJPF_RGB));
    for (int i = 0; i < n; i++) {
      size_t size = cap;
      unsigned char *dst = out;
      const unsigned char *src = rgb + ((size_t)boxes[i][1] * w + boxes[i][0]) * 3;
      CHECK(c, tj3Compress8(c, src, boxes[i][2], w * 3, boxes[i][3], TJPF_RGB, &dst, &size));
      bytes += size;
    }
    t[r] = clock_ms(CLOCK_MONOTONIC) - t0; /* t[0] is the warm-up */
    cpu[r] = clock_ms(CLOCK_THREAD_CPUTIME_ID) - c0;
  }
  qsort(t + 1, reps, sizeof(double), cmp);
  qsort(cpu + 1, reps, sizeof(double), cmp);
  double median = t[1 + reps / 2], cpu_median = cpu[1 + reps / 2];
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  printf("raw libjpeg-turbo (C, TurboJPEG 3 API): %dx%d, %d crops, q%d, %d reps: median %.1f ms CPU (min %.1f, max %.1f),"
         " %.1f ms wall -> limit %ld cores / %.1f ms = %.1f tasks/s (by wall time %.1f tasks/s)\n",
         w, h, n, quality, reps, cpu_median, cpu[1], cpu[reps], median, cores, cpu_median,
         cores * 1000.0 / cpu_median, cores * 1000.0 / median);
  return bytes == 0;
}
