/* One rectangle of a JPEG, decoded by libjpeg-turbo's partial decompression.

   A training crop needs ~60 % of a 500x375 photo's pixels on average.
   jpeg_skip_scanlines skips the rows above the crop without the inverse DCT,
   upsampling or colour conversion, decoding stops after its last row, and
   jpeg_crop_scanline runs those stages only on its columns (TensorFlow's
   decode_and_crop_jpeg does the same). Entropy decoding still covers every
   row down to the crop's bottom: the format offers no way around it.

   The pixels equal the same rectangle of a full decode (libjpeg-turbo's
   "fancy" upsampling blends each chroma sample with its neighbours, so a
   few columns each side of the rectangle are decoded and dropped;
   tests/test_decode_crop.py compares against simplejpeg's full decode).
   The GIL is released while decoding. Built only where libjpeg-turbo's
   headers are found (pyproject.toml); jaxdml.data.augment falls back to
   full decodes without it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

/* Columns decoded past each side of the rectangle (see above). */
#define EDGE_MARGIN 8
/* Rows asked of libjpeg per call: one at a time cost ~10 % of a full decode
   (docs/benchmarks.md). */
#define ROWS_PER_READ 16

struct region_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
  struct region_error *err = (struct region_error *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

/* Warnings (a truncated file, say) are not errors: the missing rows come out
   grey, as simplejpeg's and PIL's non-strict decodes have it. */
static void on_message(j_common_ptr cinfo, int level) { (void)cinfo; (void)level; }

/* [start, start + length) lies in [0, size); start, length >= 0 were checked,
   and the sum is taken unsigned so no int overflows. */
static int inside(int start, int length, JDIMENSION size) {
  return (JDIMENSION)start + (JDIMENSION)length <= size;
}

/* Bytes from one row of `out` to the next, or 0 if `out` is not a height x
   width x 3 byte image whose rows are contiguous: a C-contiguous buffer of
   that size, or a 3-D view of a larger image (rows strided, pixels packed). */
static Py_ssize_t row_stride(const Py_buffer *out, int width, int height) {
  Py_ssize_t row = (Py_ssize_t)width * 3;
  if (out->itemsize != 1) return 0;
  if (PyBuffer_IsContiguous(out, 'C')) return out->len == row * height ? row : 0;
  if (out->ndim != 3 || out->shape[0] != height || out->shape[1] != width ||
      out->shape[2] != 3 || out->strides[2] != 1 || out->strides[1] != 3 ||
      out->strides[0] < row)
    return 0;
  return out->strides[0];
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
  Py_buffer src, dst;
  PyObject *out_object;
  int denom, left, top, width, height;
  (void)self;
  if (!PyArg_ParseTuple(args, "y*iiiiiO", &src, &denom, &left, &top, &width, &height, &out_object))
    return NULL;
  if (PyObject_GetBuffer(out_object, &dst, PyBUF_RECORDS) < 0) {
    PyBuffer_Release(&src);
    return NULL;
  }
  const char *why = NULL;
  Py_ssize_t stride = 0;
  if (denom != 1 && denom != 2 && denom != 4 && denom != 8)
    why = "denom must be 1, 2, 4 or 8";
  else if (left < 0 || top < 0 || width <= 0 || height <= 0)
    why = "the region needs left, top >= 0 and width, height > 0";
  else if ((stride = row_stride(&dst, width, height)) == 0)
    why = "out must be a uint8 [height, width, 3] array with contiguous rows (C-contiguous, or "
          "rows of a larger image)";
  if (why) {
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyErr_SetString(PyExc_ValueError, why);
    return NULL;
  }
  struct jpeg_decompress_struct cinfo;
  struct region_error err;
  JSAMPLE *volatile row = NULL;
  int failed = 0;
  JDIMENSION image_width = 0, image_height = 0;
  Py_BEGIN_ALLOW_THREADS
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.emit_message = on_message;
  err.message[0] = 0;
  jpeg_create_decompress(&cinfo);
  if (setjmp(err.jump)) {
    failed = 1;
  } else {
    jpeg_mem_src(&cinfo, (const unsigned char *)src.buf, (unsigned long)src.len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    cinfo.dct_method = JDCT_ISLOW;  /* simplejpeg's and libjpeg's default */
    jpeg_start_decompress(&cinfo);
    image_width = cinfo.output_width;
    image_height = cinfo.output_height;
    if (inside(left, width, image_width) && inside(top, height, image_height)) {
      JDIMENSION right = (JDIMENSION)left + (JDIMENSION)width + EDGE_MARGIN;
      if (right > image_width) right = image_width;
      /* jpeg_crop_scanline moves x back to an iMCU boundary and widens w. */
      JDIMENSION x = left > EDGE_MARGIN ? left - EDGE_MARGIN : 0, w = right - x;
      jpeg_crop_scanline(&cinfo, &x, &w);
      row = (JSAMPLE *)malloc((size_t)w * 3 * ROWS_PER_READ);
      if (row == NULL) {
        failed = 2;
      } else {
        if (top > 0) jpeg_skip_scanlines(&cinfo, top);
        unsigned char *out = (unsigned char *)dst.buf;
        JSAMPROW rows[ROWS_PER_READ];
        for (int k = 0; k < ROWS_PER_READ; k++) rows[k] = row + (size_t)k * w * 3;
        for (int y = 0; y < height;) {
          int want = height - y < ROWS_PER_READ ? height - y : ROWS_PER_READ;
          int got = (int)jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)want);
          for (int k = 0; k < got; k++, y++)
            memcpy(out + y * stride, rows[k] + (size_t)(left - x) * 3, (size_t)width * 3);
        }
      }
    }
  }
  free(row);
  jpeg_destroy_decompress(&cinfo);  /* also ends a decode stopped before its last row */
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&src);
  PyBuffer_Release(&dst);
  if (failed == 1) return PyErr_Format(PyExc_ValueError, "libjpeg could not decode the file: %s",
                                       err.message);
  if (failed == 2) return PyErr_NoMemory();
  if (!inside(left, width, image_width) || !inside(top, height, image_height))
    return PyErr_Format(PyExc_ValueError,
                        "region (left %d, top %d, width %d, height %d) leaves the %ux%u image "
                        "decoded at 1/%d scale", left, top, width, height, image_width,
                        image_height, denom);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, denom, left, top, width, height, out): the JPEG `data` decoded at 1/denom "
     "scale (1, 2, 4, 8), its rectangle at (left, top) of width x height decoded pixels written "
     "into `out` (uint8 RGB [height, width, 3]: C-contiguous, or rows of a larger image)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "Partial JPEG decompression (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
