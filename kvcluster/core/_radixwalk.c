/* Native batch walk of the prefix index's radix tree (kvcluster/core/radix_walk.py).
 *
 * The tree itself stays in Python (RadixNode objects, their `children` dicts keyed by the
 * first token's 8 bytes, and `key` edges of int64 bytes); this module only walks it, so every
 * structural change, policy and invariant lives in one place. A batched lookup of short
 * prompts spends most of its time in the interpreter's dispatch around two dict lookups and a
 * memcmp per prompt; here the same walk is one C loop over the batch.
 *
 * walk_batch(root, buffer, bounds, shortest)
 *     buffer: the prompts' int64 token ids back to back (bytes);
 *     bounds: byte offsets, prompt i is buffer[bounds[i]:bounds[i + 1]] (non-empty);
 *     shortest: bytes a match needs to count as a hit (the minimum prefix, at least one id).
 *   -> (positions, nodes, hits, hit_bytes): where each match ends (its start for a miss), the
 *      node it ends in (None for a miss), the hit nodes in order, and the matched bytes in all.
 *
 * The result is the one the Python walk in PrefixIndex._lookup_buffer gives; the tests run
 * both on the same trees.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#define ID_BYTES 8

static PyObject *children_name = NULL;
static PyObject *key_name = NULL;

/* Bytes (a multiple of 8) that `key` shares with `query[0:available]`. */
static Py_ssize_t
common_prefix(const char *key, Py_ssize_t key_length, const char *query, Py_ssize_t available)
{
    Py_ssize_t limit = (key_length < available ? key_length : available) / ID_BYTES * ID_BYTES;
    Py_ssize_t at = 0;
    while (at < limit && memcmp(key + at, query + at, ID_BYTES) == 0) {
        at += ID_BYTES;
    }
    return at;
}

/* node.children[first] or NULL with no error when absent (a new reference). A leaf's
 * children are a shared read-only empty mapping, not a dict. */
static PyObject *
child_of(PyObject *node, const char *first)
{
    PyObject *children = PyObject_GetAttr(node, children_name);
    if (children == NULL) {
        return NULL;
    }
    PyObject *child = NULL;
    if (PyDict_CheckExact(children)) {
        if (PyDict_GET_SIZE(children) != 0) {
            PyObject *lookup = PyBytes_FromStringAndSize(first, ID_BYTES);
            if (lookup != NULL) {
                child = PyDict_GetItemWithError(children, lookup); /* borrowed */
                Py_XINCREF(child);
                Py_DECREF(lookup);
            }
        }
    } else if (PyObject_Length(children) > 0) {
        PyObject *lookup = PyBytes_FromStringAndSize(first, ID_BYTES);
        if (lookup != NULL) {
            child = PyObject_GetItem(children, lookup);
            if (child == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) {
                PyErr_Clear();
            }
            Py_DECREF(lookup);
        }
    } else if (PyErr_Occurred()) {
        child = NULL;
    }
    Py_DECREF(children);
    return child;
}

/* Walk buffer[start:end] from root. Sets *node_out (a new reference) and returns the byte
 * offset where the match ends, or -1 with an exception set. */
static Py_ssize_t
descend(PyObject *root, const char *buffer, Py_ssize_t start, Py_ssize_t end, PyObject **node_out)
{
    PyObject *node = Py_NewRef(root);
    Py_ssize_t pos = start;
    while (pos < end) {
        PyObject *child = child_of(node, buffer + pos);
        if (child == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(node);
                return -1;
            }
            break;
        }
        PyObject *key = PyObject_GetAttr(child, key_name);
        if (key == NULL || !PyBytes_Check(key)) {
            if (key != NULL) {
                PyErr_SetString(PyExc_TypeError, "a radix node's key must be bytes");
                Py_DECREF(key);
            }
            Py_DECREF(child);
            Py_DECREF(node);
            return -1;
        }
        Py_ssize_t key_length = PyBytes_GET_SIZE(key);
        const char *key_bytes = PyBytes_AS_STRING(key);
        Py_DECREF(node);
        node = child;
        if (key_length <= end - pos && memcmp(key_bytes, buffer + pos, (size_t)key_length) == 0) {
            pos += key_length;
            Py_DECREF(key);
            continue;
        }
        /* The first token matched (the child was found by it); the edge ends inside. */
        pos += common_prefix(key_bytes, key_length, buffer + pos, end - pos);
        Py_DECREF(key);
        break;
    }
    *node_out = node;
    return pos;
}

static PyObject *
walk_batch(PyObject *module, PyObject *args)
{
    PyObject *root;
    Py_buffer buffer;
    PyObject *bounds;
    Py_ssize_t shortest;
    if (!PyArg_ParseTuple(args, "Oy*O!n:walk_batch", &root, &buffer, &PyList_Type, &bounds, &shortest)) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t count = PyList_GET_SIZE(bounds) - 1;
    if (count < 0) {
        count = 0;
    }
    PyObject *positions = PyList_New(count);
    PyObject *nodes = PyList_New(count);
    PyObject *hits = PyList_New(0);
    if (positions == NULL || nodes == NULL || hits == NULL) {
        goto done;
    }
    const char *data = (const char *)buffer.buf;
    Py_ssize_t hit_bytes = 0;
    Py_ssize_t start = count ? PyLong_AsSsize_t(PyList_GET_ITEM(bounds, 0)) : 0;
    if (start == -1 && PyErr_Occurred()) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t end = PyLong_AsSsize_t(PyList_GET_ITEM(bounds, i + 1));
        if (end == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (start < 0 || end <= start || end > buffer.len || (end - start) % ID_BYTES) {
            PyErr_Format(PyExc_ValueError, "prompt %zd spans bytes [%zd, %zd) of a %zd-byte buffer", i, start, end,
                         buffer.len);
            goto done;
        }
        PyObject *node;
        Py_ssize_t pos = descend(root, data, start, end, &node);
        if (pos < 0) {
            goto done;
        }
        if (pos - start < shortest) {
            Py_DECREF(node);
            PyList_SET_ITEM(nodes, i, Py_NewRef(Py_None));
            pos = start;
        } else {
            if (PyList_Append(hits, node) < 0) {
                Py_DECREF(node);
                goto done;
            }
            PyList_SET_ITEM(nodes, i, node); /* steals the reference */
            hit_bytes += pos - start;
        }
        PyObject *position = PyLong_FromSsize_t(pos);
        if (position == NULL) {
            goto done;
        }
        PyList_SET_ITEM(positions, i, position);
        start = end;
    }
    result = Py_BuildValue("(OOOn)", positions, nodes, hits, hit_bytes);
done:
    /* A partly filled list holds NULL slots, which list deallocation skips. */
    Py_XDECREF(positions);
    Py_XDECREF(nodes);
    Py_XDECREF(hits);
    PyBuffer_Release(&buffer);
    return result;
}

static PyObject *
descend_one(PyObject *module, PyObject *args)
{
    PyObject *root;
    Py_buffer buffer;
    Py_ssize_t start;
    Py_ssize_t end;
    if (!PyArg_ParseTuple(args, "Oy*nn:descend", &root, &buffer, &start, &end)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (start < 0 || end < start || end > buffer.len || (end - start) % ID_BYTES) {
        PyErr_Format(PyExc_ValueError, "bytes [%zd, %zd) are not whole ids of a %zd-byte buffer", start, end,
                     buffer.len);
    } else {
        PyObject *node;
        Py_ssize_t pos = descend(root, (const char *)buffer.buf, start, end, &node);
        if (pos >= 0) {
            result = Py_BuildValue("(Nn)", node, pos);
        }
    }
    PyBuffer_Release(&buffer);
    return result;
}

static PyMethodDef radixwalk_methods[] = {
    {"walk_batch", walk_batch, METH_VARARGS,
     "walk_batch(root, buffer, bounds, shortest) -> (positions, nodes, hits, hit_bytes)"},
    {"descend", descend_one, METH_VARARGS, "descend(root, buffer, start, end) -> (node, end of the match)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef radixwalk_module = {
    PyModuleDef_HEAD_INIT, "kvcluster.core._radixwalk", "Native batch walk of the prefix index's radix tree.", -1,
    radixwalk_methods,
};

PyMODINIT_FUNC
PyInit__radixwalk(void)
{
    children_name = PyUnicode_InternFromString("children");
    key_name = PyUnicode_InternFromString("key");
    if (children_name == NULL || key_name == NULL) {
        return NULL;
    }
    return PyModule_Create(&radixwalk_module);
}
