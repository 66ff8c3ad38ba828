/* layout.h: every byte layout ope's processes share, declared once.
 *
 * The data ring, the message queue and the tensor frame are described for readers in the
 * docstrings of ope/bridge/ring.py, ope/bridge/channel.py and ope/bridge/protocol.py; the values live here and
 * nowhere else. The module exports them (ope_native.LAYOUT, DTYPE_NAMES, DTYPE_ITEMSIZES),
 * and Python and the tests read them from there instead of declaring them again.
 */
#ifndef OPE_LAYOUT_H
#define OPE_LAYOUT_H

#define LINE 64 /* a cache line: what different processes write never shares one */

/* ---- data ring (ope/bridge/ring.py) ---------------------------------------------------------- */

#define RING_MAGIC 0x31474E495245504FULL /* "OPERING1" */
#define RING_HEADER LINE
#define R_MAGIC 0
#define R_AREA 8
#define R_CURSOR 16
#define R_USED 24
#define R_HIGH 32
#define R_ALLOCS 40
#define BLOCK_HEADER LINE
#define B_SIZE 0
#define B_STATE 8
#define BLOCK_FREE 0x45455246u /* "FREE" */
#define BLOCK_USED 0x44455355u /* "USED" */

/* ---- message queue (ope/bridge/channel.py) --------------------------------------------------- */

#define QUEUE_MAGIC 0x3345555145504FULL /* "OPEQUE3" */
#define Q_MAGIC 0
#define Q_CAPACITY 8
#define Q_HEAD 64
#define Q_TAIL 128
#define Q_DATA_BELL 192
#define Q_CONSUMER_SLEEPING 196
#define Q_PRODUCER_CPU 200
#define Q_GAP_NS 208
#define Q_PUSHED_NS 216
#define Q_SPACE_BELL 256
#define Q_PRODUCER_SLEEPING 260
#define Q_CONSUMER_CPU 264
#define Q_POPPED_NS 272
#define Q_CLOSED 320
#define Q_DATA 384 /* the data area starts here: the header's size */
#define RECORD_HEADER 8 /* u32 length, u32 reserved */
#define RECORD_WRAP 0xFFFFFFFFu

/* ---- messages and tensor frames (ope/bridge/protocol.py) ------------------------------------- */

#define MSG_HELLO 1
#define MSG_LOAD 2
#define MSG_READY 3
#define MSG_INFER 4
#define MSG_ERROR 5
#define MSG_RESULT 6
#define MSG_SHUTDOWN 7

#define FRAME_MARKER 0xC1 /* a first byte msgpack never uses */
#define F_MARKER 0    /* u8 */
#define F_KIND 1      /* u8  message type: MSG_INFER or MSG_RESULT */
#define F_COUNT 2     /* u16 entries that follow */
#define F_RESERVED 4  /* u32 0 */
#define F_CALL_ID 8   /* u64 */
#define F_COPIED 16   /* u64 bytes the sender copied into the arena */
#define FRAME_HEADER 24
#define E_CODE 0      /* u8  dtype code */
#define E_RANK 1      /* u8 */
#define E_NAME_LEN 2  /* u16 */
#define E_ITEMSIZE 4  /* u32 */
#define E_SEG 8       /* u64 segment id */
#define E_OFFSET 16   /* u64 payload offset in that segment */
#define E_NBYTES 24   /* u64 */
#define E_SHAPE 32    /* u64 per dim, then the name, zero-padded to a multiple of 8 */
#define ENTRY_HEADER E_SHAPE
#define FRAME_MAX_DIMS 32

/* The dtype codes of frame entries: a dtype's code is its row in this table, its name is
 * numpy's (ope.spec.DTYPES lists them in this order), its itemsize the bytes per element;
 * 0 for strings, whose itemsize is 4 bytes (one UCS-4 code point) times their width. */
#define DTYPE_TABLE(X)                                                                          \
    X(BOOL, "bool", 1) X(INT8, "int8", 1) X(INT16, "int16", 2) X(INT32, "int32", 4)             \
    X(INT64, "int64", 8) X(UINT8, "uint8", 1) X(UINT16, "uint16", 2) X(UINT32, "uint32", 4)     \
    X(UINT64, "uint64", 8) X(FLOAT16, "float16", 2) X(FLOAT32, "float32", 4)                    \
    X(FLOAT64, "float64", 8) X(STRING, "string", 0)

enum dtype_code {
#define DTYPE_CODE(id, name, itemsize) DTYPE_##id,
    DTYPE_TABLE(DTYPE_CODE)
#undef DTYPE_CODE
    N_CODES
};
#define STRING_CODE DTYPE_STRING

/* Every constant above, by name, for the module to export as ope_native.LAYOUT. */
#define LAYOUT_CONSTANTS(X)                                                                     \
    X(LINE)                                                                                     \
    X(RING_MAGIC) X(RING_HEADER) X(R_MAGIC) X(R_AREA) X(R_CURSOR) X(R_USED) X(R_HIGH)           \
    X(R_ALLOCS) X(BLOCK_HEADER) X(B_SIZE) X(B_STATE) X(BLOCK_FREE) X(BLOCK_USED)                \
    X(QUEUE_MAGIC) X(Q_MAGIC) X(Q_CAPACITY) X(Q_HEAD) X(Q_TAIL) X(Q_DATA_BELL)                  \
    X(Q_CONSUMER_SLEEPING) X(Q_PRODUCER_CPU) X(Q_GAP_NS) X(Q_PUSHED_NS) X(Q_SPACE_BELL)         \
    X(Q_PRODUCER_SLEEPING) X(Q_CONSUMER_CPU) X(Q_POPPED_NS) X(Q_CLOSED) X(Q_DATA)               \
    X(RECORD_HEADER) X(RECORD_WRAP)                                                             \
    X(MSG_HELLO) X(MSG_LOAD) X(MSG_READY) X(MSG_INFER) X(MSG_ERROR) X(MSG_RESULT)               \
    X(MSG_SHUTDOWN)                                                                             \
    X(FRAME_MARKER) X(F_MARKER) X(F_KIND) X(F_COUNT) X(F_RESERVED) X(F_CALL_ID) X(F_COPIED)     \
    X(FRAME_HEADER) X(E_CODE) X(E_RANK) X(E_NAME_LEN) X(E_ITEMSIZE) X(E_SEG) X(E_OFFSET)        \
    X(E_NBYTES) X(E_SHAPE) X(ENTRY_HEADER) X(FRAME_MAX_DIMS) X(STRING_CODE)

#endif
