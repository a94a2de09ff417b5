// Package volume owns one replica's block volume: a Device (an O_DIRECT
// file or raw block device, or dio.Mem in tests) holding keel's on-disk
// format (datapath/layout), and the request semantics the NBD layer serves
// from it.
//
// # What a Volume does
//
//   - Opening: creates and preallocates a missing file, formats a blank
//     device, refuses a size that disagrees with the superblock and a file
//     that is not a keel volume (or whose superblocks are both damaged), and
//     durably marks the volume not-clean before it serves a write. Close
//     flushes and marks it clean; WasClean says how the previous run ended.
//   - Requests: byte offsets into the data area (the volume adds the data
//     offset). Any offset and length are served: requests aligned to the
//     device's direct-I/O alignment go straight to the device with the
//     caller's buffer; others are read-modify-written through pooled
//     aligned buffers (iobuf).
//   - Ordering: every write, trim and zeroing takes a range lock over its
//     alignment-expanded range, so overlapping writes are applied one at a
//     time in arrival order (DESIGN invariant 3) and a read-modify-write
//     never races a neighbour that shares a block; disjoint writes run
//     concurrently. Reads take no range lock: a read concurrent with an
//     overlapping write may see either, which NBD allows.
//   - I/O: Open and Create issue the device's reads and writes through
//     Linux native AIO or blocking pread/pwrite as Options.AIO (or the
//     KEEL_DIO_AIO environment variable) says; see dio.File.EnableAIO. The
//     results are the same either way; only the cost differs. ReadAtSync
//     and WriteAtSync do the device's I/O with a blocking pread/pwrite on
//     the calling goroutine instead, for a caller that knows the request
//     is alone (netpath/nbd at queue depth 1, where a wakeup from the AIO
//     reaper costs more than the blocking call); same locks, same results.
//   - Durability: a FUA write is durable when WriteAt returns (RWF_DSYNC);
//     Flush is fdatasync, which covers every write completed before it from
//     any connection. A failed Flush is sticky: every later Flush fails
//     too, because after a failed fdatasync nothing says the earlier writes
//     reached the disk, and a later fdatasync that succeeds would not
//     change that. The volume must be reopened (and resynchronised, once
//     replication exists).
//   - Write-intent bitmap (DESIGN invariant 6; format in datapath/layout):
//     while a replica is out of sync the caller runs MarkDirty(off, n)
//     before each data write, which returns once the regions covering the
//     range are marked on stable storage; DirtyRegions and DirtyBytes say
//     what a returning replica must copy; ClearDirty empties it once all
//     replicas agree. A crash at any point leaves every region whose data
//     may differ marked: bitmap blocks are written whole with FUA before
//     the bits count as set, and a torn or corrupt block or header reads
//     as all dirty. Opening converts the bitmap to Options.RegionSize
//     when that differs, and repairs a bad header by writing every region
//     dirty. The bitmap is independent of the clean flag: a clean close
//     keeps it, since the other replicas may still be behind.
//   - The epoch (DESIGN invariant 2) is persisted in the superblock before
//     SetEpoch returns, and never goes backwards.
//
// Errors wrap a unix.Errno for the NBD layer to translate: EINVAL out of
// range, EPERM for a write to a read-only volume, ENOTSUP for a FAST_ZERO
// that has no fast way, ESHUTDOWN after Close, and the device's errno (EIO,
// ENOSPC, ...) for a failed I/O, for that request only.
//
// Buffer ownership: ReadAt and WriteAt borrow p for the duration of the call
// and retain nothing.
//
// No request allocates in the aligned steady state (tested with
// testing.AllocsPerRun); error paths may.
package volume

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"keel/datapath/dio"
	"keel/datapath/iobuf"
	"keel/datapath/layout"
)

// Device is the storage a Volume lives on. dio.File and dio.Mem implement
// it; see package dio for the contract (alignment, fallback, fast).
type Device interface {
	Name() string
	Size() int64
	MemAlign() int
	OffsetAlign() int
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64, fua bool) error
	Sync() error
	PunchHole(off, n int64, fallback bool) (fast bool, err error)
	ZeroRange(off, n int64, fallback bool) (fast bool, err error)
	Extents(off, n int64, fn func(length int64, hole, zero bool) bool) error
	Close() error
}

// SyncDevice is a Device that can also do a read or write synchronously
// on the calling goroutine whatever its AIO mode (dio.File, dio.Mem); a
// Volume on one serves ReadAtSync and WriteAtSync with them, and on any
// other Device with ReadAt and WriteAt.
type SyncDevice interface {
	Device
	ReadAtSync(p []byte, off int64) error
	WriteAtSync(p []byte, off int64, fua bool) error
}

var (
	_ SyncDevice = (*dio.File)(nil)
	_ SyncDevice = (*dio.Mem)(nil)
)

// Options configure Open, Create and OpenDevice.
type Options struct {
	// Logger receives open/close events and warnings (a damaged
	// superblock slot, an unclean last shutdown). nil discards.
	Logger *slog.Logger
	// ReadOnly opens without writing anything, superblock included.
	ReadOnly bool
	// BlockSize is the block size advertised to clients, stored at
	// creation; 0 means 4096. For an existing volume a non-zero value must
	// match the stored one.
	BlockSize int
	// Create: Open creates (and preallocates) a missing file; OpenDevice
	// formats a device whose metadata area is blank (all zeroes).
	Create bool
	// Size is the data size in bytes: required to create; for an existing
	// volume, when non-zero, it must match.
	Size int64
	// RegionSize is the write-intent bitmap's granularity in data bytes
	// (see MarkDirty): a power of two, at least 4096 and the block size.
	// 0 means: for a new volume layout.DefaultRegionSize (1 MiB), raised
	// as far as a large volume needs; for an existing one, what it has.
	// A different value for an existing volume converts its bitmap when
	// it opens (a new region is dirty if any old one it overlaps was;
	// read-only, in memory only). A value too small for the volume (the
	// bitmap tracks at most layout.RegionCapacity regions) is refused
	// with a message naming the smallest that fits.
	RegionSize int64
	// AIO is how Open and Create issue aligned reads and writes on the
	// file or device (dio.File.EnableAIO). dio.AIODefault takes the
	// environment variable KEEL_DIO_AIO (off, always, concurrent) when it
	// is set, else dio.DefaultAIO. OpenDevice leaves the device as given.
	AIO dio.AIOMode
}

// aioEnv names the environment variable that chooses dio.AIODefault's
// meaning, for benchmarks that compare the paths without a rebuild.
const aioEnv = "KEEL_DIO_AIO"

// enableAIO turns on the AIO mode opts ask for on f. A refusal (io_setup
// failing, say at aio-max-nr) is logged and leaves f synchronous, which
// serves everything just the same; dio.Stats counts it.
func enableAIO(f *dio.File, opts Options, log *slog.Logger) error {
	mode := opts.AIO
	if mode == dio.AIODefault {
		if s, ok := os.LookupEnv(aioEnv); ok {
			m, err := dio.ParseAIOMode(s)
			if err != nil {
				return fmt.Errorf("volume %s: %s: %w", f.Name(), aioEnv, err)
			}
			mode = m
		}
	}
	if err := f.EnableAIO(mode, aioDepth); err != nil {
		log.Warn("volume: native AIO unavailable; using synchronous direct I/O", "path", f.Name(), "err", err)
	}
	return nil
}

// aioDepth is the AIO submission slots per file: nbd.DefaultMaxInFlight,
// so that one connection at its bound never falls back.
const aioDepth = 128

// Sentinel errors, matched with errors.Is.
var (
	// ErrNotVolume: the file or device holds no keel superblock.
	ErrNotVolume = errors.New("not a keel volume")
	// ErrCorrupt: keel metadata is there but unusable.
	ErrCorrupt = errors.New("corrupt keel volume")
	// ErrInUse: another process has the volume open.
	ErrInUse = errors.New("volume in use by another process")
	// ErrClosed: the volume was closed; it wraps ESHUTDOWN.
	ErrClosed = fmt.Errorf("volume closed: %w", unix.ESHUTDOWN)
	// ErrReadOnly: a write to a read-only volume; it wraps EPERM.
	ErrReadOnly = fmt.Errorf("volume is read-only: %w", unix.EPERM)
)

// bounceChunk is the largest buffer read-modify-write and unaligned reads
// use at a time: requests larger than this are served in pieces, so the
// bounce buffer stays within iobuf's classes whatever the request size.
const bounceChunk = 1 << 20

// Volume is one open replica. Its methods are safe for concurrent use.
type Volume struct {
	dev       Device
	sdev      SyncDevice // dev, when it is one; else nil
	log       *slog.Logger
	name      string
	readOnly  bool
	size      int64 // data bytes
	dataOff   int64 // device offset of data byte 0
	blockSize int
	align     int64 // offset/length alignment of direct I/O (power of two)
	memAlign  int
	id        [16]byte
	wasClean  bool

	epoch   atomic.Uint64         // mirror of sb.Epoch for lock-free reads
	syncErr atomic.Pointer[error] // first failed fdatasync; sticky

	locks RangeLock

	intent *intentMap // the write-intent bitmap; its own locks

	closeMu sync.RWMutex // requests hold it shared, Close exclusively
	closed  bool         // guarded by closeMu

	sbMu sync.Mutex        // guards sb; serialises superblock writes
	sb   layout.Superblock // the newest durable superblock
}

// Create makes a new volume file of size data bytes at path (which must not
// exist): the file is preallocated (metadata area + data) and formatted.
func Create(path string, size int64, opts Options) (*Volume, error) {
	if err := checkSize(path, size, opts.BlockSize); err != nil {
		return nil, err
	}
	if opts.ReadOnly {
		return nil, fmt.Errorf("volume %s: cannot create a read-only volume: %w", path, unix.EINVAL)
	}
	f, err := dio.Create(path, layout.DataOffset+size)
	if err != nil {
		return nil, fmt.Errorf("volume %s: create: %w", path, err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := enableAIO(f, opts, opts.Logger); err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	opts.Create, opts.Size = true, size
	v, err := OpenDevice(f, opts)
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	return v, nil
}

// Open opens the volume file or block device at path. With opts.Create and
// opts.Size a missing file is created (see Create); an existing file is
// never formatted: without a valid superblock it is refused.
func Open(path string, opts Options) (*Volume, error) {
	f, err := dio.Open(path, opts.ReadOnly)
	switch {
	case err == nil:
	case errors.Is(err, unix.ENOENT) && opts.Create:
		if opts.Size == 0 {
			return nil, fmt.Errorf("volume %s does not exist; give a size to create it: %w", path, unix.ENOENT)
		}
		return Create(path, opts.Size, opts)
	case errors.Is(err, unix.EWOULDBLOCK):
		return nil, fmt.Errorf("volume %s: %w: %w", path, ErrInUse, err)
	default:
		return nil, fmt.Errorf("volume %s: open: %w", path, err)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := enableAIO(f, opts, opts.Logger); err != nil {
		f.Close()
		return nil, err
	}
	opts.Create = false
	v, err := OpenDevice(f, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return v, nil
}

// OpenDevice opens the volume on dev. With opts.Create a device whose
// metadata area is all zeroes is formatted with opts.Size data bytes. On
// success the Volume owns dev (Close closes it); on error the caller still
// does.
func OpenDevice(dev Device, opts Options) (*Volume, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	name := dev.Name()
	align, memAlign := dev.OffsetAlign(), dev.MemAlign()
	if align <= 0 || align&(align-1) != 0 || align > layout.SuperblockSize || memAlign <= 0 || memAlign > iobuf.Align {
		return nil, fmt.Errorf("volume %s: device needs direct-I/O alignment %d (memory %d); keel supports powers of two up to %d: %w",
			name, align, memAlign, layout.SuperblockSize, unix.EINVAL)
	}

	meta := iobuf.Get(2 * layout.SuperblockSize)
	defer meta.Release()
	if dev.Size() < 2*layout.SuperblockSize {
		return nil, fmt.Errorf("volume %s: %w: it is %d bytes, too small to hold a superblock", name, ErrNotVolume, dev.Size())
	}
	if err := dev.ReadAt(meta.Bytes(), 0); err != nil {
		return nil, fmt.Errorf("volume %s: reading superblocks: %w", name, err)
	}
	blank := isZero(meta.Bytes())
	if blank && opts.Create {
		if opts.ReadOnly {
			return nil, fmt.Errorf("volume %s: cannot format a read-only volume: %w", name, unix.EINVAL)
		}
		if err := format(dev, opts.Size, opts.BlockSize, opts.RegionSize); err != nil {
			return nil, err
		}
		log.Info("volume formatted", "path", name, "size", opts.Size)
		if err := dev.ReadAt(meta.Bytes(), 0); err != nil {
			return nil, fmt.Errorf("volume %s: reading superblocks: %w", name, err)
		}
	}
	l, err := layout.Load(meta.Bytes()[:layout.SuperblockSize], meta.Bytes()[layout.SuperblockSize:])
	if err != nil {
		if blank {
			return nil, fmt.Errorf("volume %s: %w: its metadata area is all zeroes (no superblock); an interrupted create leaves this, remove the file to start over", name, ErrNotVolume)
		}
		if errors.Is(l.SlotErr[0], layout.ErrBadMagic) && errors.Is(l.SlotErr[1], layout.ErrBadMagic) {
			return nil, fmt.Errorf("volume %s: %w: no keel superblock in slot A or B; refusing to use it", name, ErrNotVolume)
		}
		return nil, fmt.Errorf("volume %s: %w: refusing to use it: %w", name, ErrCorrupt, err)
	}
	if d := l.Damaged(); d != nil {
		log.Warn("volume superblock slot damaged; using the other (the next superblock write repairs it)",
			"path", name, "used_slot", layout.SlotName(l.Slot), "generation", l.Generation, "damage", d)
	}
	sb := l.Superblock
	if need := sb.DataOffset + sb.DataSize; dev.Size() < need {
		return nil, fmt.Errorf("volume %s: %w: it is %d bytes but its superblock says %d (truncated?)", name, ErrCorrupt, dev.Size(), need)
	}
	if opts.Size != 0 && opts.Size != sb.DataSize {
		return nil, &SizeMismatchError{Path: name, Have: sb.DataSize, Want: opts.Size}
	}
	if opts.BlockSize != 0 && opts.BlockSize != int(sb.BlockSize) {
		return nil, fmt.Errorf("volume %s has block size %d, not the requested %d: %w", name, sb.BlockSize, opts.BlockSize, unix.EINVAL)
	}
	if sb.DataOffset%int64(align) != 0 {
		return nil, fmt.Errorf("volume %s: %w: data offset %d not aligned to the device's %d", name, ErrCorrupt, sb.DataOffset, align)
	}

	region := sb.RegionSize
	switch {
	case opts.RegionSize != 0:
		if err := checkRegionSize(name, opts.RegionSize, sb.DataSize, sb.BlockSize); err != nil {
			return nil, err
		}
		region = uint32(opts.RegionSize)
	case (sb.DataSize+int64(region)-1)/int64(region) > layout.RegionCapacity:
		// A volume made when the bitmap had no checksums could have
		// more regions than the area now holds.
		if region = layout.RegionSizeFor(sb.DataSize, region); region == 0 {
			return nil, fmt.Errorf("volume %s: %w: %d data bytes are too many for the write-intent bitmap", name, ErrCorrupt, sb.DataSize)
		}
	}
	ld, err := loadIntent(dev, &sb, region)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}

	v := &Volume{
		dev: dev, log: log, name: name, readOnly: opts.ReadOnly,
		size: sb.DataSize, dataOff: sb.DataOffset, blockSize: int(sb.BlockSize),
		align: int64(align), memAlign: memAlign, id: sb.VolumeID, wasClean: sb.Clean,
		sb: sb, intent: ld.m,
	}
	v.sdev, _ = dev.(SyncDevice)
	v.epoch.Store(sb.Epoch)
	switch {
	case ld.why != nil:
		log.Warn("volume write-intent bitmap header unusable: every region counts as dirty (a returning replica copies everything)",
			"path", name, "why", ld.why)
	case ld.convert != 0:
		log.Info("volume write-intent bitmap converted to a new region size", "path", name,
			"from", ld.convert, "to", region, "dirty_bytes", v.DirtyBytes())
	}
	if ld.bad > 0 {
		log.Warn("volume write-intent bitmap blocks torn or corrupt: their regions count as dirty", "path", name, "blocks", ld.bad)
	}
	if !opts.ReadOnly {
		// Not clean from now until Close: durable before any write. The
		// superblock takes the region size first; a crash before the
		// bitmap follows leaves the old bitmap, converted again next time.
		next := sb
		next.Clean = false
		next.RegionSize = region
		if err := v.writeSuperblockLocked(next); err != nil {
			return nil, err
		}
		if ld.rewrite {
			if err := v.intent.writeArea(dev, ld.maxGen+1); err != nil {
				return nil, fmt.Errorf("volume %s: %w", name, err)
			}
		}
	}
	log.Info("volume opened", "path", name, "size", v.size, "block_size", v.blockSize, "region_size", region,
		"dirty_bytes", v.DirtyBytes(),
		"read_only", v.readOnly, "last_shutdown_clean", v.wasClean, "epoch", sb.Epoch,
		"dio_align", align, "dio_mem_align", memAlign)
	if !v.wasClean {
		log.Warn("volume was not shut down cleanly: writes not flushed before the stop may be lost", "path", name)
	}
	return v, nil
}

// format writes the write-intent bitmap (all clean) and then the two
// superblock slots of a new volume: until the superblocks are there the
// device counts as blank.
func format(dev Device, size int64, blockSize int, regionSize int64) error {
	name := dev.Name()
	if err := checkSize(name, size, blockSize); err != nil {
		return err
	}
	if need := layout.DataOffset + size; dev.Size() < need {
		return fmt.Errorf("volume %s: device of %d bytes cannot hold %d data bytes plus %d of metadata: %w",
			name, dev.Size(), size, int64(layout.DataOffset), unix.ENOSPC)
	}
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return fmt.Errorf("volume %s: volume id: %w", name, err)
	}
	sb, err := layout.New(id, size, blockSize)
	if err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	if regionSize != 0 {
		if err := checkRegionSize(name, regionSize, size, sb.BlockSize); err != nil {
			return err
		}
		sb.RegionSize = uint32(regionSize)
	}
	sb.Clean = true // nothing written yet
	if err := newIntentMap(size, sb.RegionSize, id, 1).writeArea(dev, 1); err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	buf := iobuf.Get(layout.SuperblockSize)
	defer buf.Release()
	// Generation 1 in slot B, then 2 in slot A: both slots valid from the
	// start, so a damaged slot is never mistaken for a fresh one.
	for gen := uint64(1); gen <= 2; gen++ {
		sb.Generation = gen
		if err := sb.Encode(buf.Bytes()); err != nil {
			return fmt.Errorf("volume %s: %w", name, err)
		}
		if err := dev.WriteAt(buf.Bytes(), layout.SlotOffset(sb.Slot()), true); err != nil {
			return fmt.Errorf("volume %s: writing superblock: %w", name, err)
		}
	}
	return nil
}

// writeSuperblockLocked durably writes next as the next generation, to the
// slot the previous one is not in, and makes it current.
// REQUIRES: v.sbMu, or v not yet shared.
func (v *Volume) writeSuperblockLocked(next layout.Superblock) error {
	next.Generation = v.sb.Generation + 1
	buf := iobuf.Get(layout.SuperblockSize)
	defer buf.Release()
	if err := next.Encode(buf.Bytes()); err != nil {
		return fmt.Errorf("volume %s: %w", v.name, err)
	}
	if err := v.dev.WriteAt(buf.Bytes(), layout.SlotOffset(next.Slot()), true); err != nil {
		return fmt.Errorf("volume %s: writing superblock slot %s: %w", v.name, layout.SlotName(next.Slot()), err)
	}
	v.sb = next
	return nil
}

func checkSize(name string, size int64, blockSize int) error {
	if size <= 0 || size%layout.SizeAlign != 0 {
		return fmt.Errorf("volume %s: size %d bytes is not a positive multiple of %d: %w", name, size, layout.SizeAlign, unix.EINVAL)
	}
	if blockSize != 0 {
		if blockSize < 512 || blockSize > 65536 || blockSize&(blockSize-1) != 0 {
			return fmt.Errorf("volume %s: block size %d is not a power of two in [512, 65536]: %w", name, blockSize, unix.EINVAL)
		}
		if size%int64(blockSize) != 0 {
			return fmt.Errorf("volume %s: size %d bytes is not a multiple of the block size %d: %w", name, size, blockSize, unix.EINVAL)
		}
	}
	return nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// SizeMismatchError: an existing volume's size differs from the one asked
// for. It wraps EINVAL. Its message is phrased for `keel serve`, the
// command that asks for a size.
type SizeMismatchError struct {
	Path       string
	Have, Want int64
}

func (e *SizeMismatchError) Error() string {
	return fmt.Sprintf("volume %s has size %s (%d bytes), not the requested %s: pass --size %s or use another --file",
		e.Path, humanSize(e.Have), e.Have, humanSize(e.Want), sizeFlag(e.Have))
}

func (e *SizeMismatchError) Unwrap() error { return unix.EINVAL }

var units = []struct {
	shift       uint
	name, short string
}{{40, "TiB", "T"}, {30, "GiB", "G"}, {20, "MiB", "M"}, {10, "KiB", "K"}}

// humanSize writes n in the largest binary unit that divides it exactly
// ("4 GiB"), else as "%.1f unit" ("1.5 GiB"), else in bytes.
func humanSize(n int64) string {
	for _, u := range units {
		if n >= 1<<u.shift {
			if n%(1<<u.shift) == 0 {
				return fmt.Sprintf("%d %s", n>>u.shift, u.name)
			}
			return fmt.Sprintf("%.1f %s", float64(n)/float64(int64(1)<<u.shift), u.name)
		}
	}
	return fmt.Sprintf("%d bytes", n)
}

// sizeFlag writes n exactly, as --size takes it: "4G", "512M", or bytes.
func sizeFlag(n int64) string {
	for _, u := range units {
		if n >= 1<<u.shift && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d%s", n>>u.shift, u.short)
		}
	}
	return fmt.Sprint(n)
}

// Name is the path of the file or device.
func (v *Volume) Name() string { return v.name }

// ID is the volume id chosen at creation.
func (v *Volume) ID() [16]byte { return v.id }

// WasClean reports whether the previous run closed the volume cleanly.
func (v *Volume) WasClean() bool { return v.wasClean }

// Size is the data size: what clients see.
func (v *Volume) Size() int64 { return v.size }

// BlockSize is the preferred block size advertised to clients.
func (v *Volume) BlockSize() int { return v.blockSize }

// MinBlockSize is 1: unaligned requests are served by read-modify-write.
func (v *Volume) MinBlockSize() int { return 1 }

// IOAlign is the device's direct-I/O offset and length alignment: requests
// aligned to it (with buffers aligned like iobuf's) take the fast path.
func (v *Volume) IOAlign() int { return int(v.align) }

// ReadOnly reports whether the volume was opened read-only.
func (v *Volume) ReadOnly() bool { return v.readOnly }

// Epoch is the highest epoch persisted.
func (v *Volume) Epoch() uint64 { return v.epoch.Load() }

// SetEpoch durably records epoch e before returning. It refuses to go
// backwards (EINVAL); setting the current epoch again is a no-op.
func (v *Volume) SetEpoch(e uint64) error {
	if err := v.begin(); err != nil {
		return err
	}
	defer v.end()
	if v.readOnly {
		return ErrReadOnly
	}
	v.sbMu.Lock()
	defer v.sbMu.Unlock()
	switch {
	case e < v.sb.Epoch:
		return fmt.Errorf("volume %s: epoch %d is older than the recorded %d: %w", v.name, e, v.sb.Epoch, unix.EINVAL)
	case e == v.sb.Epoch:
		return nil
	}
	next := v.sb
	next.Epoch = e
	if err := v.writeSuperblockLocked(next); err != nil {
		return err
	}
	v.epoch.Store(e)
	return nil
}

// Close waits for requests in progress, flushes, durably marks the volume
// clean (unless a flush ever failed) and closes the device. Requests after
// Close fail with ErrClosed.
func (v *Volume) Close() error {
	v.closeMu.Lock()
	defer v.closeMu.Unlock()
	if v.closed {
		return ErrClosed
	}
	v.closed = true
	var errs []error
	clean := false
	if !v.readOnly {
		if err := v.syncLocked(); err != nil {
			errs = append(errs, err)
		} else {
			v.sbMu.Lock()
			next := v.sb
			next.Clean = true
			if err := v.writeSuperblockLocked(next); err != nil {
				errs = append(errs, err)
			} else {
				clean = true
			}
			v.sbMu.Unlock()
		}
	}
	if err := v.dev.Close(); err != nil {
		errs = append(errs, fmt.Errorf("volume %s: %w", v.name, err))
	}
	v.log.Info("volume closed", "path", v.name, "clean", clean || v.readOnly && v.wasClean)
	return errors.Join(errs...)
}
