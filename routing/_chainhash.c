/* Native inner loop of the block-hash chain (routing/block_hashing.py).
 *
 * The chain is sequential by construction (key[i] = H(block i || key[i-1])), so the Python
 * fast path still pays one interpreter iteration per block: ~150-300 ns against ~20 ns for
 * XXH3-128 of an 80-byte input. This module runs the whole chain in one C call, with the GIL
 * released.
 *
 * XXH3-128 is looked up at run time in the `xxhash` package's extension module (it exports the
 * libxxhash API). SHA-256 has two engines:
 *   - the x86 SHA extensions (SHA-NI), when the CPU has them: SHA-256 is fixed by FIPS 180-4,
 *     and compressing here lets the chain overlap work that a library call cannot (below);
 *   - otherwise SHA256_Init/Update/Final from the libcrypto that Python's `_hashlib` links.
 * The Python side binds the libraries (giving their paths), then checks the native chain
 * against the pure-Python one on fixed inputs before using it; any mismatch or missing symbol
 * leaves the pure-Python path in place.
 *
 * Why SHA-NI by hand: a block's input is its tokens (64 bytes at block size 16) then its
 * parent's key, 80 bytes, so two compressions. The first reads only the tokens, so it does not
 * wait for the chain: the loop computes block i+1's tokens compression while block i's second
 * compression (the one that needs key[i-1]) runs, and the CPU overlaps the two. Only one
 * compression per block stays on the sequential path: 2,048 blocks in ~110 us against ~190 us
 * through libcrypto one call per block on the same machine.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SHA_NI_CODE 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define HAVE_SHA_NI_CODE 0
#endif

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

/* ALGORITHM_SHA256 takes the fastest engine the CPU allows; ALGORITHM_SHA256_LIBCRYPTO always
 * calls libcrypto (so tests can compare the two engines on any machine). */
enum { ALGORITHM_XXH3_128 = 0, ALGORITHM_SHA256 = 1, ALGORITHM_SHA256_LIBCRYPTO = 2 };

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


#if HAVE_SHA_NI_CODE
#define SHA_NI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

static const uint32_t SHA256_ROUND_CONSTANTS[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t SHA256_INITIAL_STATE[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/* The eight state words as the SHA extensions hold them: (A, B, E, F) and (C, D, G, H). */
typedef struct {
    __m128i abef;
    __m128i cdgh;
} sha_ni_state;

/* Byte order of one 16-byte lane of big-endian words. */
#define SHA_NI_BSWAP_WORDS() _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL)

static int
cpu_has_sha_ni(void)
{
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_SSSE3) || !(ecx & bit_SSE4_1)) {
        return 0;
    }
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
        return 0;
    }
    return (ebx & bit_SHA) != 0;
}

SHA_NI_TARGET static sha_ni_state
sha_ni_initial_state(void)
{
    __m128i dcba = _mm_loadu_si128((const __m128i *)&SHA256_INITIAL_STATE[0]);
    __m128i hgfe = _mm_loadu_si128((const __m128i *)&SHA256_INITIAL_STATE[4]);
    __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
    __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
    sha_ni_state state;
    state.abef = _mm_alignr_epi8(cdab, efgh, 8);
    state.cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
    return state;
}

/* One SHA-256 compression of a 64-byte chunk into `state`. */
SHA_NI_TARGET static inline sha_ni_state
sha_ni_compress(sha_ni_state state, const unsigned char *chunk)
{
    const __m128i bswap = SHA_NI_BSWAP_WORDS();
    __m128i schedule[4]; /* message words 4g..4g+3, a ring of the last 16 */
    __m128i abef = state.abef, cdgh = state.cdgh;
#pragma GCC unroll 16
    for (int group = 0; group < 16; group++) {
        if (group < 4) {
            schedule[group] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(chunk + 16 * group)), bswap);
        } else {
            /* W[t..t+3] from W[t-16..t-13], W[t-12..t-9], W[t-7..t-4] and W[t-4..t-1]. */
            __m128i oldest = schedule[group & 3], older = schedule[(group + 1) & 3];
            __m128i old = schedule[(group + 2) & 3], newest = schedule[(group + 3) & 3];
            __m128i words = _mm_add_epi32(_mm_sha256msg1_epu32(oldest, older), _mm_alignr_epi8(newest, old, 4));
            schedule[group & 3] = _mm_sha256msg2_epu32(words, newest);
        }
        __m128i message = _mm_add_epi32(
            schedule[group & 3], _mm_loadu_si128((const __m128i *)&SHA256_ROUND_CONSTANTS[4 * group]));
        cdgh = _mm_sha256rnds2_epu32(cdgh, abef, message);
        abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(message, 0x0E));
    }
    state.abef = _mm_add_epi32(state.abef, abef);
    state.cdgh = _mm_add_epi32(state.cdgh, cdgh);
    return state;
}

/* The first 16 bytes of the digest (words A, B, C, D, big-endian). */
SHA_NI_TARGET static inline void
sha_ni_store_key(sha_ni_state state, unsigned char *out)
{
    __m128i feba = _mm_shuffle_epi32(state.abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(state.cdgh, 0xB1);
    __m128i dcba = _mm_blend_epi16(feba, dchg, 0xF0);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(dcba, SHA_NI_BSWAP_WORDS()));
}

/* The state after the whole 64-byte chunks of a block's tokens (they come first in its input). */
SHA_NI_TARGET static inline sha_ni_state
sha_ni_tokens_state(sha_ni_state initial, const unsigned char *tokens, size_t whole_chunks)
{
    for (size_t c = 0; c < whole_chunks; c++) {
        initial = sha_ni_compress(initial, tokens + 64 * c);
    }
    return initial;
}

/* The SHA-256 chain over `count` blocks of `width` bytes: key[i] = SHA-256(block i || key[i-1])
 * truncated to 16 bytes. Block i+1's token chunks are compressed before block i's last
 * chunks: they do not depend on key[i-1], so the CPU runs them alongside the chain. */
SHA_NI_TARGET static void
sha_ni_chain(const unsigned char *start, const unsigned char *blocks, Py_ssize_t count, Py_ssize_t width,
             unsigned char *out)
{
    size_t whole_chunks = (size_t)width / 64, rest = (size_t)width % 64;
    /* The last chunk(s): the tokens past the whole chunks, the parent key, then the padding
     * (0x80, zeros, the message length in bits as a big-endian u64). */
    size_t tail_length = rest + KEY_BYTES + 9 <= 64 ? 64 : 128;
    unsigned char tail[128];
    memset(tail, 0, sizeof tail);
    tail[rest + KEY_BYTES] = 0x80;
    uint64_t message_bits = ((uint64_t)width + KEY_BYTES) * 8;
    for (int b = 0; b < 8; b++) {
        tail[tail_length - 1 - b] = (unsigned char)(message_bits >> (8 * b));
    }
    memcpy(tail + rest, start, KEY_BYTES);
    const sha_ni_state initial = sha_ni_initial_state();
    sha_ni_state next_tokens = sha_ni_tokens_state(initial, blocks, whole_chunks);
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *block = blocks + i * width;
        sha_ni_state state = next_tokens;
        if (i + 1 < count) {
            next_tokens = sha_ni_tokens_state(initial, block + width, whole_chunks);
        }
        memcpy(tail, block + 64 * whole_chunks, rest);
        state = sha_ni_compress(state, tail);
        if (tail_length == 128) {
            state = sha_ni_compress(state, tail + 64);
        }
        sha_ni_store_key(state, out + i * KEY_BYTES);
        sha_ni_store_key(state, tail + rest); /* the next block's parent */
    }
}
#endif /* HAVE_SHA_NI_CODE */

static int cpu_sha_ni = -1; /* -1: not probed yet */

static int
use_sha_ni(void)
{
#if HAVE_SHA_NI_CODE
    if (cpu_sha_ni < 0) {
        cpu_sha_ni = cpu_has_sha_ni();
    }
    return cpu_sha_ni;
#else
    return 0;
#endif
}

static PyObject *
sha256_engine(PyObject *module, PyObject *unused)
{
    return PyUnicode_FromString(use_sha_ni() ? "sha-ni" : (bound_sha256_final ? "libcrypto" : "none"));
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
 * tokens of one block). Returns the keys of every block back to back, 16 bytes each, where
 * key[i] = H(block i || key[i-1]) and the first block's parent is `start`.
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
    int sha_ni = algorithm == ALGORITHM_SHA256 && use_sha_ni();
    if ((algorithm == ALGORITHM_XXH3_128 && bound_xxh3_128 == NULL) ||
        (algorithm == ALGORITHM_SHA256 && !sha_ni && bound_sha256_final == NULL) ||
        (algorithm == ALGORITHM_SHA256_LIBCRYPTO && bound_sha256_final == NULL) ||
        (algorithm != ALGORITHM_XXH3_128 && algorithm != ALGORITHM_SHA256 &&
         algorithm != ALGORITHM_SHA256_LIBCRYPTO)) {
        PyErr_Format(PyExc_RuntimeError, "hash algorithm %d is not bound", algorithm);
        goto done;
    }
    Py_ssize_t count = blocks.len / width;
    result = PyBytes_FromStringAndSize(NULL, count * KEY_BYTES);
    input = PyMem_RawMalloc((size_t)(width + KEY_BYTES));
    if (result == NULL || input == NULL) {
        Py_CLEAR(result);
        if (input == NULL) {
            PyErr_NoMemory();
        }
        goto done;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    const unsigned char *source = (const unsigned char *)blocks.buf;
    Py_BEGIN_ALLOW_THREADS
#if HAVE_SHA_NI_CODE
    if (sha_ni) {
        if (count > 0) {
            sha_ni_chain((const unsigned char *)start, source, count, width, out);
        }
    }
    else
#endif
    {
        unsigned char sha_digest[32];
        sha256_context sha_context;
        memcpy(input + width, start, KEY_BYTES);
        for (Py_ssize_t i = 0; i < count; i++) {
            memcpy(input, source + i * width, (size_t)width);
            unsigned char *key = out + i * KEY_BYTES;
            if (algorithm == ALGORITHM_XXH3_128) {
                xxh128_hash digest = bound_xxh3_128(input, (size_t)(width + KEY_BYTES));
                /* The canonical (big-endian, high half first) form, as xxh3_128_digest returns. */
                store_big_endian(key, digest.high64);
                store_big_endian(key + 8, digest.low64);
            } else {
                bound_sha256_init(&sha_context);
                bound_sha256_update(&sha_context, input, (size_t)(width + KEY_BYTES));
                bound_sha256_final(sha_digest, &sha_context);
                memcpy(key, sha_digest, KEY_BYTES);
            }
            memcpy(input + width, key, KEY_BYTES);
        }
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
    {"sha256_engine", sha256_engine, METH_NOARGS, "'sha-ni', 'libcrypto' or 'none': what computes ALGORITHM_SHA256."},
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
