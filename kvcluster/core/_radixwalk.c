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
#include <structmember.h>

#include <stdint.h>
#include <string.h>

#define ID_BYTES 8

/* RadixNode's attributes. Nodes are read and written through their __slots__ offsets when
 * the node's type is the one whose layout was learnt (every call learns it from the root's
 * type); any other object goes through the generic attribute protocol. */
enum slot {
    SLOT_CHILDREN, SLOT_KEY, SLOT_END, SLOT_PARENT, SLOT_PATH_BLOCKS, SLOT_PIN_COUNT,
    SLOT_TERMINAL, SLOT_START, SLOT_NAMESPACE, SLOT_NODE_ID, SLOT_LAST_ACCESS, SLOT_FREQ,
    SLOT_REUSE_VALUE, SLOT_REUSE_OWNER, SLOT_COUNT
};
static const char *const slot_spelling[SLOT_COUNT] = {
    "children", "key", "end", "parent", "path_blocks", "pin_count",
    "terminal", "start", "namespace", "node_id", "last_access", "freq",
    "reuse_value", "reuse_owner",
};
static PyObject *slot_names[SLOT_COUNT];
static PyObject *unranked = NULL; /* -inf: RadixNode's UNRANKED, the reuse rank of a new node */
static PyTypeObject *layout_type = NULL; /* a strong reference, so its address is never reused */
static Py_ssize_t slot_offsets[SLOT_COUNT];

/* Learn where `type` keeps each attribute, if every one is a plain object slot. */
static void
learn_layout(PyTypeObject *type)
{
    if (type == layout_type) {
        return;
    }
    Py_ssize_t offsets[SLOT_COUNT];
    for (int i = 0; i < SLOT_COUNT; i++) {
        PyObject *descriptor = type->tp_dict ? PyDict_GetItemWithError(type->tp_dict, slot_names[i]) : NULL;
        if (descriptor == NULL || !Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
            PyErr_Clear();
            return; /* not a __slots__ class like RadixNode: the generic protocol serves */
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type != T_OBJECT_EX || (member->flags & READONLY)) {
            return;
        }
        offsets[i] = member->offset;
    }
    memcpy(slot_offsets, offsets, sizeof offsets);
    Py_INCREF(type);
    Py_XSETREF(layout_type, type);
}

/* obj.<slot> as a new reference, or NULL with AttributeError. */
static inline PyObject *
get_slot(PyObject *obj, enum slot which)
{
    if (Py_TYPE(obj) == layout_type) {
        PyObject *value = *(PyObject **)((char *)obj + slot_offsets[which]);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(obj, slot_names[which]);
}

static inline int
set_slot(PyObject *obj, enum slot which, PyObject *value)
{
    if (Py_TYPE(obj) == layout_type) {
        PyObject **field = (PyObject **)((char *)obj + slot_offsets[which]);
        PyObject *old = *field;
        *field = Py_NewRef(value);
        Py_XDECREF(old);
        return 0;
    }
    return PyObject_SetAttr(obj, slot_names[which], value);
}

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
    PyObject *children = get_slot(node, SLOT_CHILDREN);
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
        PyObject *key = get_slot(child, SLOT_KEY);
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
    learn_layout(Py_TYPE(root));
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
    learn_layout(Py_TYPE(root));
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


static Py_ssize_t
ssize_attribute(PyObject *node, enum slot which)
{
    PyObject *value = get_slot(node, which);
    if (value == NULL) {
        return -1;
    }
    Py_ssize_t result = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return result;
}

/* insert_walk(root, tokens, blocks, bounds, block_bounds, shortest, block_size, next_id, now,
 *             namespace, node_type, leaf_children, split)
 *
 * The structural part of PrefixIndex._insert_items (see there): for each item
 * tokens[bounds[i]:bounds[i+1]] with blocks blocks[block_bounds[i]:block_bounds[i+1]], walk
 * the tree, split the edge the walk stopped in (by calling split(node, depth, node_id), which
 * returns the new upper node with that id), and either mark the cached sequence's end or add
 * a new leaf. Returns (leaves, adopted, uppers, straddles, pinned_straddles, present, marked,
 * new_bytes, splits, skipped, next_id) exactly as the Python loop builds them.
 */
static PyObject *
insert_walk(PyObject *module, PyObject *args)
{
    PyObject *root, *bounds, *block_bounds, *now, *namespace, *leaf_children, *split;
    Py_buffer tokens, blocks;
    Py_ssize_t shortest, block_size, next_id;
    PyTypeObject *node_type;
    if (!PyArg_ParseTuple(args, "Oy*y*O!O!nnnOOO!OO:insert_walk", &root, &tokens, &blocks, &PyList_Type, &bounds,
                          &PyList_Type, &block_bounds, &shortest, &block_size, &next_id, &now, &namespace,
                          &PyType_Type, &node_type, &leaf_children, &split)) {
        return NULL;
    }
    learn_layout(node_type);
    PyObject *result = NULL;
    PyObject *leaves = PyList_New(0), *adopted = PyList_New(0), *uppers = PyList_New(0);
    PyObject *straddles = PyList_New(0), *pinned_straddles = PyList_New(0), *present = PyList_New(0);
    PyObject *marked = PyList_New(0), *empty = PyTuple_New(0), *zero = PyLong_FromLong(0);
    Py_ssize_t new_bytes = 0, splits = 0, skipped = 0;
    const char *data = (const char *)tokens.buf;
    const char *block_data = (const char *)blocks.buf;
    Py_ssize_t count = PyList_GET_SIZE(bounds) - 1;
    if (!leaves || !adopted || !uppers || !straddles || !pinned_straddles || !present || !marked || !empty || !zero) {
        goto done;
    }
    if (block_size <= 0 || PyList_GET_SIZE(block_bounds) != PyList_GET_SIZE(bounds)) {
        PyErr_SetString(PyExc_ValueError, "bounds and block_bounds must have the same length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t start = PyLong_AsSsize_t(PyList_GET_ITEM(bounds, i));
        Py_ssize_t end = PyLong_AsSsize_t(PyList_GET_ITEM(bounds, i + 1));
        Py_ssize_t block_start = PyLong_AsSsize_t(PyList_GET_ITEM(block_bounds, i));
        Py_ssize_t block_end = PyLong_AsSsize_t(PyList_GET_ITEM(block_bounds, i + 1));
        if (PyErr_Occurred()) {
            goto done;
        }
        if (start < 0 || end <= start || end > tokens.len || (end - start) % ID_BYTES || block_start < 0 ||
            block_end < block_start || block_end > blocks.len) {
            PyErr_Format(PyExc_ValueError, "item %zd spans bytes [%zd, %zd) of the tokens and [%zd, %zd) of the blocks",
                         i, start, end, block_start, block_end);
            goto done;
        }
        if (end - start < shortest) {
            skipped++;
            continue;
        }
        PyObject *node;
        Py_ssize_t pos = descend(root, data, start, end, &node);
        if (pos < 0) {
            goto done;
        }
        Py_ssize_t depth = (pos - start) / ID_BYTES;
        Py_ssize_t node_end = ssize_attribute(node, SLOT_END);
        if (node_end == -1 && PyErr_Occurred()) {
            Py_DECREF(node);
            goto done;
        }
        PyObject *parent;
        if (depth < node_end) { /* the walk stopped inside node's edge: split it there */
            splits++;
            parent = PyObject_CallFunction(split, "Onn", node, depth, next_id);
            if (parent == NULL) {
                Py_DECREF(node);
                goto done;
            }
            next_id++;
            if (PyList_Append(uppers, parent) < 0) {
                Py_DECREF(node);
                Py_DECREF(parent);
                goto done;
            }
            if (depth % block_size) {
                /* The block holding the split point is shared by both halves: a straddle. */
                PyObject *path = get_slot(node, SLOT_PATH_BLOCKS);
                Py_ssize_t pin_count = ssize_attribute(node, SLOT_PIN_COUNT);
                Py_ssize_t offset = (depth / block_size) * ID_BYTES;
                int failed = path == NULL || (pin_count == -1 && PyErr_Occurred()) || !PyBytes_Check(path) ||
                             PyBytes_GET_SIZE(path) < offset + ID_BYTES;
                PyObject *block = NULL;
                if (!failed) {
                    int64_t id;
                    memcpy(&id, PyBytes_AS_STRING(path) + offset, sizeof id);
                    block = PyLong_FromLongLong(id);
                    failed = block == NULL || PyList_Append(straddles, block) < 0 ||
                             (pin_count && PyList_Append(pinned_straddles, block) < 0);
                }
                if (failed && !PyErr_Occurred()) {
                    PyErr_SetString(PyExc_ValueError, "a split node's path_blocks do not cover the split");
                }
                Py_XDECREF(block);
                Py_XDECREF(path);
                if (failed) {
                    Py_DECREF(node);
                    Py_DECREF(parent);
                    goto done;
                }
            }
            Py_DECREF(node);
        } else {
            parent = node;
        }
        if (pos == end) { /* already cached: keep its blocks, mark where this sequence ends */
            PyObject *terminal = get_slot(parent, SLOT_TERMINAL);
            int is_terminal = terminal == NULL ? -1 : PyObject_IsTrue(terminal);
            Py_XDECREF(terminal);
            PyObject *entry = NULL;
            int failed = is_terminal < 0;
            if (!failed && !is_terminal) {
                failed = set_slot(parent, SLOT_TERMINAL, Py_True) < 0 || PyList_Append(marked, parent) < 0;
            }
            if (!failed) {
                entry = Py_BuildValue("(nO)", PyList_GET_SIZE(leaves), parent);
                failed = entry == NULL || PyList_Append(present, entry) < 0;
            }
            Py_XDECREF(entry);
            Py_DECREF(parent);
            if (failed) {
                goto done;
            }
            continue;
        }
        Py_ssize_t low = (depth / block_size) * ID_BYTES;
        if (block_start + low > block_end) {
            PyErr_Format(PyExc_ValueError, "item %zd has too few blocks for its tokens", i);
            Py_DECREF(parent);
            goto done;
        }
        PyObject *leaf = NULL, *key = NULL, *own = NULL, *path = NULL, *parent_path = NULL, *children = NULL;
        PyObject *start_value = NULL, *end_value = NULL, *id_value = NULL, *first = NULL;
        int failed = 1;
        parent_path = get_slot(parent, SLOT_PATH_BLOCKS);
        if (parent_path == NULL || !PyBytes_Check(parent_path) || PyBytes_GET_SIZE(parent_path) < low) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "a node's path_blocks do not cover its edge");
            }
            goto leaf_done;
        }
        leaf = node_type->tp_new(node_type, empty, NULL);
        key = PyBytes_FromStringAndSize(data + pos, end - pos);
        own = PyBytes_FromStringAndSize(block_data + block_start + low, block_end - block_start - low);
        path = PyBytes_FromStringAndSize(NULL, low + block_end - block_start - low);
        start_value = PyLong_FromSsize_t(depth);
        end_value = PyLong_FromSsize_t((end - start) / ID_BYTES);
        id_value = PyLong_FromSsize_t(next_id);
        first = PyBytes_FromStringAndSize(data + pos, ID_BYTES);
        if (!leaf || !key || !own || !path || !start_value || !end_value || !id_value || !first) {
            goto leaf_done;
        }
        memcpy(PyBytes_AS_STRING(path), PyBytes_AS_STRING(parent_path), (size_t)low);
        memcpy(PyBytes_AS_STRING(path) + low, PyBytes_AS_STRING(own), (size_t)PyBytes_GET_SIZE(own));
        {
            const enum slot fields[] = {SLOT_KEY, SLOT_START, SLOT_END, SLOT_PARENT, SLOT_CHILDREN,
                                        SLOT_PATH_BLOCKS, SLOT_NAMESPACE, SLOT_NODE_ID, SLOT_LAST_ACCESS,
                                        SLOT_FREQ, SLOT_PIN_COUNT, SLOT_TERMINAL, SLOT_REUSE_VALUE,
                                        SLOT_REUSE_OWNER};
            PyObject *const values[] = {key, start_value, end_value, parent, leaf_children, path, namespace,
                                        id_value, now, zero, zero, Py_True, unranked, Py_None};
            for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) {
                if (set_slot(leaf, fields[f], values[f]) < 0) {
                    goto leaf_done;
                }
            }
        }
        children = get_slot(parent, SLOT_CHILDREN);
        if (children == NULL) {
            goto leaf_done;
        }
        if (PyDict_CheckExact(children)) {
            if (PyDict_SetItem(children, first, leaf) < 0) {
                goto leaf_done;
            }
        } else { /* a leaf's shared read-only empty mapping: give the parent a real dict */
            PyObject *fresh = PyDict_New();
            int bad = fresh == NULL || PyDict_SetItem(fresh, first, leaf) < 0 ||
                      set_slot(parent, SLOT_CHILDREN, fresh) < 0;
            Py_XDECREF(fresh);
            if (bad) {
                goto leaf_done;
            }
        }
        if (PyList_Append(leaves, leaf) < 0 || PyList_Append(adopted, own) < 0) {
            goto leaf_done;
        }
        next_id++;
        new_bytes += end - pos;
        failed = 0;
    leaf_done:
        Py_XDECREF(leaf);
        Py_XDECREF(key);
        Py_XDECREF(own);
        Py_XDECREF(path);
        Py_XDECREF(parent_path);
        Py_XDECREF(children);
        Py_XDECREF(start_value);
        Py_XDECREF(end_value);
        Py_XDECREF(id_value);
        Py_XDECREF(first);
        Py_DECREF(parent);
        if (failed) {
            goto done;
        }
    }
    result = Py_BuildValue("(OOOOOOOnnnn)", leaves, adopted, uppers, straddles, pinned_straddles, present, marked,
                           new_bytes, splits, skipped, next_id);
done:
    Py_XDECREF(leaves);
    Py_XDECREF(adopted);
    Py_XDECREF(uppers);
    Py_XDECREF(straddles);
    Py_XDECREF(pinned_straddles);
    Py_XDECREF(present);
    Py_XDECREF(marked);
    Py_XDECREF(empty);
    Py_XDECREF(zero);
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&blocks);
    return result;
}

static PyMethodDef radixwalk_methods[] = {
    {"walk_batch", walk_batch, METH_VARARGS,
     "walk_batch(root, buffer, bounds, shortest) -> (positions, nodes, hits, hit_bytes)"},
    {"descend", descend_one, METH_VARARGS, "descend(root, buffer, start, end) -> (node, end of the match)"},
    {"insert_walk", insert_walk, METH_VARARGS, "The structural loop of a batch insert (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef radixwalk_module = {
    PyModuleDef_HEAD_INIT, "kvcluster.core._radixwalk", "Native batch walk of the prefix index's radix tree.", -1,
    radixwalk_methods,
};

PyMODINIT_FUNC
PyInit__radixwalk(void)
{
    for (int i = 0; i < SLOT_COUNT; i++) {
        slot_names[i] = PyUnicode_InternFromString(slot_spelling[i]);
        if (slot_names[i] == NULL) {
            return NULL;
        }
    }
    unranked = PyFloat_FromDouble(-Py_HUGE_VAL);
    if (unranked == NULL) {
        return NULL;
    }
    return PyModule_Create(&radixwalk_module);
}
