package inspect

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// layout is an open queue directory: its split (conf-split) and a
// descriptor for each directory a message has files in, so that reading a
// message costs no path walk from the root and no runtime poller set-up.
// With 100,000 messages that is most of the time spent.
type layout struct {
	dir    string
	split  int
	mess   []int // per split
	info   []int
	local  []int
	remote []int
	todo   []int // one, or per split with the big-todo patch
	bounce []int // one
}

// noDir stands for a directory that is not there: every file in it is
// missing.
const noDir = -1

// openLayout opens the queue at dir.
func openLayout(dir string) (*layout, error) {
	split, err := SplitOf(dir)
	if err != nil {
		return nil, err
	}
	l := &layout{dir: dir, split: split}
	splitDirs := func(sub string) ([]int, error) {
		fds := make([]int, split)
		for s := range split {
			fd, err := openDir(filepath.Join(dir, sub, strconv.Itoa(s)))
			if err != nil {
				return nil, err
			}
			fds[s] = fd
		}
		return fds, nil
	}
	one := func(sub string) ([]int, error) {
		fd, err := openDir(filepath.Join(dir, sub))
		return []int{fd}, err
	}
	if l.mess, err = splitDirs("mess"); err == nil {
		if l.info, err = splitDirs("info"); err == nil {
			if l.local, err = splitDirs("local"); err == nil {
				if l.remote, err = splitDirs("remote"); err == nil {
					if l.bounce, err = one("bounce"); err == nil {
						if HasBigTodo(dir) {
							l.todo, err = splitDirs("todo")
						} else {
							l.todo, err = one("todo")
						}
					}
				}
			}
		}
	}
	if err != nil {
		l.close()
		return nil, err
	}
	return l, nil
}

// HasBigTodo reports whether the queue at dir splits todo/ and intd/ like
// mess/ (the big-todo patch).
func HasBigTodo(dir string) bool {
	fi, err := os.Stat(filepath.Join(dir, "todo", "0"))
	return err == nil && fi.IsDir()
}

// SplitOf finds the queue's conf-split by counting the numbered directories
// in mess/.
func SplitOf(dir string) (int, error) {
	names, err := readNames(filepath.Join(dir, "mess"))
	if err != nil {
		return 0, fmt.Errorf("not a readable qmail queue: %w", err)
	}
	split := 0
	for _, n := range names {
		if v, err := strconv.Atoi(n); err == nil && v >= 0 && v < 1<<16 {
			split = max(split, v+1)
		}
	}
	if split == 0 {
		return 0, fmt.Errorf("not a qmail queue: %s has no split directories", filepath.Join(dir, "mess"))
	}
	return split, nil
}

func openDir(name string) (int, error) {
	fd, err := ignoringEINTR(func() (int, error) {
		return unix.Open(name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	})
	if errors.Is(err, unix.ENOENT) {
		return noDir, nil
	}
	if err != nil {
		return noDir, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	return fd, nil
}

func (l *layout) close() {
	for _, fds := range [][]int{l.mess, l.info, l.local, l.remote, l.todo, l.bounce} {
		for _, fd := range fds {
			if fd != noDir {
				unix.Close(fd)
			}
		}
	}
}

// dirOf picks the directory a file of message id lives in.
func (l *layout) dirOf(dirs []int, id uint64) int {
	if len(dirs) == 1 {
		return dirs[0]
	}
	return dirs[id%uint64(len(dirs))]
}

// path names a file for error messages.
func (l *layout) path(sub string, id uint64) string {
	name := strconv.FormatUint(id, 10)
	switch {
	case sub == "bounce", sub == "todo" && len(l.todo) == 1:
		return filepath.Join(l.dir, sub, name)
	}
	return filepath.Join(l.dir, sub, strconv.FormatUint(id%uint64(l.split), 10), name)
}

// openAt opens name in directory dirfd for reading. The error is an
// unix.Errno (fs.ErrNotExist for ENOENT).
func openAt(dirfd int, name string) (int, error) {
	if dirfd == noDir {
		return -1, unix.ENOENT
	}
	return ignoringEINTR(func() (int, error) {
		return unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	})
}

// readAt reads all of name in directory dirfd, and its modification time in
// Unix seconds and nanoseconds.
func readAt(dirfd int, name string) ([]byte, unix.Timespec, error) {
	fd, err := openAt(dirfd, name)
	if err != nil {
		return nil, unix.Timespec{}, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if _, err := ignoringEINTR(func() (int, error) { return 0, unix.Fstat(fd, &st) }); err != nil {
		return nil, unix.Timespec{}, err
	}
	data := make([]byte, 0, st.Size+1) // +1: see EOF in the same read
	for {
		if len(data) == cap(data) {
			data = append(data, 0)[:len(data)]
		}
		n, err := ignoringEINTR(func() (int, error) { return unix.Read(fd, data[len(data):cap(data)]) })
		if err != nil {
			return nil, unix.Timespec{}, err
		}
		if n == 0 {
			return data, st.Mtim, nil
		}
		data = data[:len(data)+n]
	}
}

// fdReader reads a raw descriptor.
type fdReader int

func (fd fdReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, err := ignoringEINTR(func() (int, error) { return unix.Read(int(fd), p) })
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, io.EOF
	}
	return n, nil
}

// ignoringEINTR retries fn while it is interrupted by a signal (the Go
// runtime sends SIGURG for preemption), as package os does.
func ignoringEINTR(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if err != unix.EINTR {
			return n, err
		}
	}
}

func readNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Readdirnames(-1)
}
