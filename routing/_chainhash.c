/* Native inner loop of the block-hash chain (routing/block_hashing.py).
 *
 * The chain is sequential by construction (key[i] = H(key[i-1] || block i)), so the Python
 * fast path still pays one interpreter iteration per block: ~150-300 ns against ~20 ns for
 * XXH3-128 of an 80-byte input. This module runs the whole chain in one C call, with the GIL
 * released.
 *
 * It carries no hash implementation of its own. The digest functions are looked up at run
 * time in libraries the interpreter has already loaded for packages kvcluster depends on:
 *   - XXH3_128bits from the `xxhash` package's extension module (it exports the libxxhash API);
 *   - SHA256_Init/Update/Final from the libcrypto that Python's `_hashlib` links.
 * The Python side binds them (giving the library paths), then checks the native chain against
 * the pure-Python one on fixed inputs before using it; any mismatch or missing symbol leaves
 * the pure-Python path in place.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#define KEY_BYTES 16

/* XXH128_hash_t of libxxhash 0.8: returned by value, {low64, high64}. */
typedef struct {
    uint64_t low64;
    uint64_t high64;
} xxh128_hash;

typedef xxh128_hash (*xxh3_128_fn)(const void *data, size_t length);
/* OpenSSL's low-level SHA-256 (SHA256_Init/Update/Final): the one-shot SHA256() of OpenSSL 3
 * fetches the algorithm through EVP on every call, which costs more than hashing 80 bytes. */
typedef int (*sha256_init_fn)(void *context);
typedef int (*sha256_update_fn)(void *context, const void *data, size_t length);
typedef int (*sha256_final_fn)(unsigned char *digest, void *context);

/* Larger than SHA256_CTX (112 bytes in OpenSSL 1.1 and 3), and aligned for its fields. */
typedef union {
    unsigned char bytes[256];
    uint64_t align;
} sha256_context;

static xxh3_128_fn bound_xxh3_128 = NULL;
static sha256_init_fn bound_sha256_init = NULL;
static sha256_update_fn bound_sha256_update = NULL;
static sha256_final_fn bound_sha256_final = NULL;

enum { ALGORITHM_XXH3_128 = 0, ALGORITHM_SHA256 = 1 };

static void *
lookup_symbol(const char *library_path, const char *symbol)
{
    /* The library is already loaded by the interpreter, so this only takes a reference. */
    void *handle = dlopen(library_path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        PyErr_Format(PyExc_OSError, "cannot open %s: %s", library_path, dlerror());
        return NULL;
    }
    void *address = dlsym(handle, symbol); /* searches the library and its dependencies */
    if (address == NULL) {
        PyErr_Format(PyExc_OSError, "%s has no symbol %s", library_path, symbol);
        dlclose(handle);
        return NULL;
    }
    return address; /* the handle stays open for the life of the process */
}

static PyObject *
bind_xxh3_128(PyObject *module, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:bind_xxh3_128", &path)) {
        return NULL;
    }
    void *address = lookup_symbol(path, "XXH3_128bits");
    if (address == NULL) {
        return NULL;
    }
    bound_xxh3_128 = (xxh3_128_fn)address;
    Py_RETURN_NONE;
}

static PyObject *
bind_sha256(PyObject *module, PyObject *args)
{
    const char *path;
    if (!PyArg_ParseTuple(args, "s:bind_sha256", &path)) {
        return NULL;
    }
    void *init = lookup_symbol(path, "SHA256_Init");
    void *update = init ? lookup_symbol(path, "SHA256_Update") : NULL;
    void *final = update ? lookup_symbol(path, "SHA256_Final") : NULL;
    if (final == NULL) {
        return NULL;
    }
    bound_sha256_init = (sha256_init_fn)init;
    bound_sha256_update = (sha256_update_fn)update;
    bound_sha256_final = (sha256_final_fn)final;
    Py_RETURN_NONE;
}

static void
store_big_endian(unsigned char *out, uint64_t value)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)(value & 0xFF);
        value >>= 8;
    }
}

/* chain(algorithm, start, blocks, width) -> bytes
 *
 * `blocks` is a contiguous buffer of whole blocks, `width` bytes each (the little-endian int32
 * tokens of one block). Returns the keys of every block back to back, 16 bytes each, where the
 * first block's parent is `start`.
 */
static PyObject *
chain(PyObject *module, PyObject *args)
{
    int algorithm;
    const char *start;
    Py_ssize_t start_length;
    Py_buffer blocks;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "iy#y*n:chain", &algorithm, &start, &start_length, &blocks, &width)) {
        return NULL;
    }
    PyObject *result = NULL;
    unsigned char *input = NULL;
    if (start_length != KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "start must be %d bytes, got %zd", KEY_BYTES, start_length);
        goto done;
    }
    if (width <= 0 || blocks.len % width != 0) {
        PyErr_Format(PyExc_ValueError, "a %zd-byte buffer is not whole blocks of %zd bytes", blocks.len, width);
        goto done;
    }
    if ((algorithm == ALGORITHM_XXH3_128 && bound_xxh3_128 == NULL) ||
        (algorithm == ALGORITHM_SHA256 && bound_sha256_final == NULL) ||
        (algorithm != ALGORITHM_XXH3_128 && algorithm != ALGORITHM_SHA256)) {
        PyErr_Format(PyExc_RuntimeError, "hash algorithm %d is not bound", algorithm);
        goto done;
    }
    Py_ssize_t count = blocks.len / width;
    result = PyBytes_FromStringAndSize(NULL, count * KEY_BYTES);
    input = PyMem_RawMalloc((size_t)(KEY_BYTES + width));
    if (result == NULL || input == NULL) {
        Py_CLEAR(result);
        if (input == NULL) {
            PyErr_NoMemory();
        }
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *source = (const unsigned char *)blocks.buf;
    unsigned char sha_digest[32];
    sha256_context sha_context;
    memcpy(input, start, KEY_BYTES);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        memcpy(input + KEY_BYTES, source + i * width, (size_t)width);
        unsigned char *key = out + i * KEY_BYTES;
        if (algorithm == ALGORITHM_XXH3_128) {
            xxh128_hash digest = bound_xxh3_128(input, (size_t)(KEY_BYTES + width));
            /* The canonical (big-endian, high half first) form, as xxh3_128_digest returns. */
            store_big_endian(key, digest.high64);
            store_big_endian(key + 8, digest.low64);
        } else {
            bound_sha256_init(&sha_context);
            bound_sha256_update(&sha_context, input, (size_t)(KEY_BYTES + width));
            bound_sha256_final(sha_digest, &sha_context);
            memcpy(key, sha_digest, KEY_BYTES);
        }
        memcpy(input, key, KEY_BYTES);
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_RawFree(input);
    PyBuffer_Release(&blocks);
    return result;
}

static PyMethodDef chainhash_methods[] = {
    {"bind_xxh3_128", bind_xxh3_128, METH_VARARGS, "Bind XXH3_128bits from the library at the given path."},
    {"bind_sha256", bind_sha256, METH_VARARGS, "Bind SHA256_Init/Update/Final from the library at the given path or its dependencies."},
    {"chain", chain, METH_VARARGS, "chain(algorithm, start, blocks, width) -> the keys of every block, back to back."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef chainhash_module = {
    PyModuleDef_HEAD_INIT, "routing._chainhash", "Native inner loop of the block-hash chain.", -1, chainhash_methods,
};

PyMODINIT_FUNC
PyInit__chainhash(void)
{
    return PyModule_Create(&chainhash_module);
}
