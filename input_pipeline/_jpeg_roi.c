/* Region-of-interest JPEG decoding with the system libjpeg(-turbo).
 *
 * Decodes only the rows [y0, y1) and (an iMCU-aligned superset of) the
 * columns [x0, x1) of a JPEG to 8-bit RGB or RGBX (X = 255), writing the
 * pixels at their true position into a caller-provided full-size buffer.
 * Rows above y0 are skipped with jpeg_skip_scanlines (entropy decoding only,
 * no IDCT), columns outside the range with jpeg_crop_scanline, and decoding
 * stops after row y1.
 *
 * Decoder settings are the library defaults (JDCT_ISLOW, fancy upsampling,
 * no block smoothing changes), i.e. what OpenCV's imgcodecs JPEG reader uses.
 * Pixels near the edges of the decoded region may differ from a full decode
 * (chroma upsampling context); callers widen the region accordingly.
 *
 * Plain C ABI for ctypes. Every function returns
 *    0  success,
 *    1  not handled here (colour space, missing Huffman tables, any libjpeg
 *       warning, ...): the caller must fall back to a full decode,
 *    2  (jroi_check only) the data is corrupt: libjpeg warned, its first
 *       warning is written to `msg`,
 *   -1  libjpeg error; its message is written to `msg`.
 * libjpeg errors never exit the process (setjmp/longjmp error manager).
 *
 * Build: gcc -O2 -shared -fPIC _jpeg_roi.c -o _jpeg_roi.so -ljpeg
 */

#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#define JROI_OK 0
#define JROI_UNSUPPORTED 1
#define JROI_CORRUPT 2
#define JROI_ERROR (-1)

/* Bumped whenever the ABI below changes; checked by the Python wrapper. */
int jroi_abi_version(void) { return 3; }

int jroi_lib_version(void) { return JPEG_LIB_VERSION; }

struct roi_error_mgr {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int warnings;
  char first_warning[JMSG_LENGTH_MAX];
};

static void roi_error_exit(j_common_ptr cinfo) {
  struct roi_error_mgr *err = (struct roi_error_mgr *)cinfo->err;
  longjmp(err->jump, 1);
}

static void roi_emit_message(j_common_ptr cinfo, int msg_level) {
  struct roi_error_mgr *err = (struct roi_error_mgr *)cinfo->err;
  if (msg_level < 0) {  /* corrupt-data warning: counted, the first kept */
    if (err->warnings == 0) cinfo->err->format_message(cinfo, err->first_warning);
    err->warnings++;
  }
}

static void roi_output_message(j_common_ptr cinfo) { (void)cinfo; }

static void copy_message(j_common_ptr cinfo, char *msg, int msg_len) {
  char buffer[JMSG_LENGTH_MAX];
  if (msg == NULL || msg_len <= 0) return;
  buffer[0] = '\0';
  cinfo->err->format_message(cinfo, buffer);
  strncpy(msg, buffer, (size_t)msg_len - 1);
  msg[msg_len - 1] = '\0';
}

static void set_message(char *msg, int msg_len, const char *text) {
  if (msg == NULL || msg_len <= 0) return;
  strncpy(msg, text, (size_t)msg_len - 1);
  msg[msg_len - 1] = '\0';
}

static void init_errors(struct jpeg_decompress_struct *cinfo,
                        struct roi_error_mgr *err) {
  cinfo->err = jpeg_std_error(&err->pub);
  err->pub.error_exit = roi_error_exit;
  err->pub.emit_message = roi_emit_message;
  err->pub.output_message = roi_output_message;
  err->warnings = 0;
  err->first_warning[0] = '\0';
}

/* What the fast path accepts after jpeg_read_header: 8-bit YCbCr (3
 * components) or grayscale, Huffman coded, with Huffman tables present.
 * Everything else (CMYK/YCCK, Adobe RGB, arithmetic coding, 12-bit, ...) is
 * left to the full decoder. */
static int supported(const struct jpeg_decompress_struct *cinfo) {
  if (cinfo->data_precision != 8 || cinfo->arith_code) return 0;
  if (cinfo->ac_huff_tbl_ptrs[0] == NULL &&
      cinfo->ac_huff_tbl_ptrs[1] == NULL &&
      cinfo->dc_huff_tbl_ptrs[0] == NULL && cinfo->dc_huff_tbl_ptrs[1] == NULL)
    return 0;  /* Motion-JPEG frame without tables */
  if (cinfo->num_components == 3 && cinfo->jpeg_color_space == JCS_YCbCr)
    return 1;
  if (cinfo->num_components == 1 && cinfo->jpeg_color_space == JCS_GRAYSCALE)
    return 1;
  return 0;
}

/* Starts decoding `data` in the calling function: error manager, source and
 * header. libjpeg's errors longjmp back to the setjmp here, which must sit in
 * the frame of the function that goes on decoding (hence a macro); on an
 * error the message is copied and that function returns JROI_ERROR. */
#define READ_HEADER_OR_RETURN(cinfo, err, data, size, msg, msg_len) \
  do {                                                              \
    init_errors(&(cinfo), &(err));                                  \
    jpeg_create_decompress(&(cinfo));                               \
    if (setjmp((err).jump)) {                                       \
      copy_message((j_common_ptr) & (cinfo), (msg), (msg_len));     \
      jpeg_destroy_decompress(&(cinfo));                            \
      return JROI_ERROR;                                            \
    }                                                               \
    jpeg_mem_src(&(cinfo), (data), (size));                         \
    jpeg_read_header(&(cinfo), TRUE);                               \
  } while (0)

/* Header only: image size, components, progressive flag. */
int jroi_info(const unsigned char *data, unsigned long size, int *width,
              int *height, int *components, int *progressive, char *msg,
              int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct roi_error_mgr err;
  volatile int result = JROI_OK;

  READ_HEADER_OR_RETURN(cinfo, err, data, size, msg, msg_len);
  *width = (int)cinfo.image_width;
  *height = (int)cinfo.image_height;
  *components = cinfo.num_components;
  *progressive = jpeg_has_multiple_scans(&cinfo) ? 1 : 0;
  if (!supported(&cinfo)) {
    set_message(msg, msg_len, "colour space or coding not handled");
    result = JROI_UNSUPPORTED;
  } else if (err.warnings) {
    copy_message((j_common_ptr)&cinfo, msg, msg_len);
    result = JROI_UNSUPPORTED;
  }
  jpeg_destroy_decompress(&cinfo);
  return result;
}

/* Decodes rows [y0, y1) x columns [x0, x1) (clamped to the image) as RGB
 * (channels = 3) or RGBX (channels = 4) into `out`, the top-left pixel of an
 * image-sized buffer with `stride` bytes per row. The columns actually written
 * are [x0 rounded down to an iMCU boundary, x1); other pixels of `out` are
 * left untouched. `width`/`height` must be the image size (as jroi_info
 * reports); a mismatch is an error. */
int jroi_decode(const unsigned char *data, unsigned long size, int width,
                int height, int x0, int y0, int x1, int y1, int channels,
                unsigned char *out, long stride, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct roi_error_mgr err;
  volatile int result = JROI_OK;
  JDIMENSION crop_x, crop_w, row;

  /* Clamped before setjmp so that nothing below modifies the arguments. */
  if (x0 < 0) x0 = 0;
  if (y0 < 0) y0 = 0;
  if (x1 > width) x1 = width;
  if (y1 > height) y1 = height;
  READ_HEADER_OR_RETURN(cinfo, err, data, size, msg, msg_len);
  if (!supported(&cinfo)) {
    set_message(msg, msg_len, "colour space or coding not handled");
    result = JROI_UNSUPPORTED;
    goto done;
  }
  if ((int)cinfo.image_width != width || (int)cinfo.image_height != height ||
      (channels != 3 && channels != 4) || stride < (long)channels * width) {
    set_message(msg, msg_len, "image size does not match the buffer");
    result = JROI_ERROR;
    goto done;
  }
  if (x0 >= x1 || y0 >= y1) goto done;  /* nothing to decode */

  cinfo.out_color_space = channels == 4 ? JCS_EXT_RGBX : JCS_EXT_RGB;
  jpeg_start_decompress(&cinfo);
  if (err.warnings) {  /* e.g. progressive scans with corrupt data */
    copy_message((j_common_ptr)&cinfo, msg, msg_len);
    result = JROI_UNSUPPORTED;
    jpeg_abort_decompress(&cinfo);
    goto done;
  }
  crop_x = (JDIMENSION)x0;
  crop_w = (JDIMENSION)(x1 - x0);
  if (crop_x > 0 || crop_w < cinfo.output_width)
    jpeg_crop_scanline(&cinfo, &crop_x, &crop_w);
  if (y0 > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0) != (JDIMENSION)y0) {
    set_message(msg, msg_len, "could not skip to the first row");
    result = JROI_UNSUPPORTED;
    jpeg_abort_decompress(&cinfo);
    goto done;
  }
  for (row = (JDIMENSION)y0; row < (JDIMENSION)y1;) {
    JSAMPROW dst = out + (long)row * stride + (long)channels * (long)crop_x;
    if (jpeg_read_scanlines(&cinfo, &dst, 1) != 1) {
      set_message(msg, msg_len, "decoder returned no row");
      result = JROI_UNSUPPORTED;
      break;
    }
    row = cinfo.output_scanline;
  }
  if (result == JROI_OK && err.warnings) {
    /* Corrupt data inside the decoded rows: let the full decoder decide. */
    copy_message((j_common_ptr)&cinfo, msg, msg_len);
    result = JROI_UNSUPPORTED;
  }
  jpeg_abort_decompress(&cinfo);
done:
  jpeg_destroy_decompress(&cinfo);
  return result;
}

/* Reads the whole stream's coefficients (entropy decoding, no IDCT): what
 * tells a complete but corrupt JPEG ("Corrupt JPEG data: bad Huffman code",
 * "premature end of data segment", ...) from a clean one, which a full
 * decoder such as OpenCV's only prints to stderr. Any colour space. Damaged
 * data often makes libjpeg warn and then fail on a marker it cannot read,
 * after a full decoder has already produced every row: a warning before an
 * error is corruption too; an error alone is left to the decoder. */
int jroi_check(const unsigned char *data, unsigned long size, char *msg,
               int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct roi_error_mgr err;

  init_errors(&cinfo, &err);
  jpeg_create_decompress(&cinfo);
  if (setjmp(err.jump)) {
    int corrupt = err.warnings > 0;
    if (corrupt)
      set_message(msg, msg_len, err.first_warning);
    else
      copy_message((j_common_ptr)&cinfo, msg, msg_len);
    jpeg_destroy_decompress(&cinfo);
    return corrupt ? JROI_CORRUPT : JROI_ERROR;
  }
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  jpeg_read_coefficients(&cinfo);
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (err.warnings) {
    set_message(msg, msg_len, err.first_warning);
    return JROI_CORRUPT;
  }
  return JROI_OK;
}
