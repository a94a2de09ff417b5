// Package iobuf owns keel's I/O buffers: memory aligned for O_DIRECT, pooled
// in power-of-two size classes from 4 KiB up to MaxSize (32 MiB, the largest
// NBD request keel accepts).
//
// It is a leaf: it imports nothing of keel's.
//
// Ownership: Get hands the caller one *Buf, which the caller owns until it
// calls Release exactly once. A function that takes a *Buf says in its doc
// comment whether it takes ownership (and so releases it) or only borrows it
// for the duration of the call. A second Release of the same Buf panics: a
// double release would hand the same memory to two requests.
//
// All functions are safe for concurrent use.
package iobuf

import (
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"unsafe"
)

const (
	// Align is the alignment of every buffer's first byte. 4096 covers the
	// O_DIRECT memory alignment of every device keel runs on (512 or 4096).
	Align = 4096
	// MinSize is the smallest size class.
	MinSize = 4096
	// MaxSize is the largest buffer Get hands out.
	MaxSize = 32 << 20

	minShift   = 12 // log2(MinSize)
	numClasses = 14 // 4 KiB .. 32 MiB
)

// Buf is one pooled, aligned buffer. Its zero value is not usable; get one
// from Get.
type Buf struct {
	mem   []byte // full class-sized, aligned memory
	n     int    // requested length
	class int8
	held  atomic.Bool
}

// Bytes returns the buffer's first n bytes, n as given to Get or Resize.
// The slice is valid until Release; do not retain it past that.
func (b *Buf) Bytes() []byte { return b.mem[:b.n] }

// Len is the requested length.
func (b *Buf) Len() int { return b.n }

// Cap is the size of the buffer's class: the most Resize accepts.
func (b *Buf) Cap() int { return len(b.mem) }

// Resize sets the length Bytes returns; n must be within Cap.
func (b *Buf) Resize(n int) {
	if n < 0 || n > len(b.mem) {
		panic(fmt.Sprintf("iobuf: Resize(%d) outside class of %d", n, len(b.mem)))
	}
	b.n = n
}

// Release returns the buffer to its pool. The caller must not touch the
// buffer or any slice from Bytes afterwards.
func (b *Buf) Release() {
	if !b.held.CompareAndSwap(true, false) {
		panic("iobuf: Release of a buffer that is not held (double release)")
	}
	outstanding.Add(-1)
	pools[b.class].Put(b)
}

var (
	pools       [numClasses]sync.Pool
	gets        atomic.Int64
	allocs      atomic.Int64
	outstanding atomic.Int64
)

// Get returns a held buffer of at least n bytes (Bytes has length n),
// aligned to Align. n must be in [0, MaxSize]. Its contents are whatever the
// previous holder left: callers that need zeroes must clear it.
func Get(n int) *Buf {
	if n < 0 || n > MaxSize {
		panic(fmt.Sprintf("iobuf: Get(%d) outside [0, %d]", n, MaxSize))
	}
	c := classOf(n)
	gets.Add(1)
	outstanding.Add(1)
	var b *Buf
	if v := pools[c].Get(); v != nil {
		b = v.(*Buf)
	} else {
		allocs.Add(1)
		b = &Buf{mem: alignedAlloc(MinSize << c), class: int8(c)}
	}
	b.n = n
	b.held.Store(true)
	return b
}

// classOf returns the size class index for n bytes.
func classOf(n int) int {
	if n <= MinSize {
		return 0
	}
	return bits.Len(uint(n-1)) - minShift
}

// ClassSize returns the capacity of the class that serves n bytes.
func ClassSize(n int) int { return MinSize << classOf(n) }

func alignedAlloc(size int) []byte {
	m := make([]byte, size)
	if uintptr(unsafe.Pointer(&m[0]))%Align == 0 {
		return m
	}
	m = make([]byte, size+Align)
	off := Align - int(uintptr(unsafe.Pointer(&m[0]))%Align)
	return m[off : off+size : off+size]
}

// IsAligned reports whether p starts at an address that is a multiple of a.
func IsAligned(p []byte, a int) bool {
	if len(p) == 0 {
		return true
	}
	return uintptr(unsafe.Pointer(&p[0]))%uintptr(a) == 0
}

// Stats are the pool's counters since the process started.
type Stats struct {
	Gets        int64 // calls to Get
	Allocs      int64 // Gets that had to allocate fresh memory
	Outstanding int64 // buffers held now
}

// ReadStats returns the current counters.
func ReadStats() Stats {
	return Stats{Gets: gets.Load(), Allocs: allocs.Load(), Outstanding: outstanding.Load()}
}
