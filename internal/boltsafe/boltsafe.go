// Package boltsafe runs bbolt transactions so that a damaged database file
// is an error, never a crash. bbolt panics on a page it cannot make sense
// of (zeroed or overwritten under it after it was opened), and a file cut
// short under its memory map faults; View and Update turn both into an
// error wrapping ErrDamaged, so one bad page costs the request that read
// it, not the daemon. policy (the counters) and queue (the hold spool's
// records) share the file and both read it through here.
package boltsafe

import (
	"errors"
	"fmt"
	"runtime/debug"

	bolt "go.etcd.io/bbolt"
)

// ErrDamaged is wrapped by the error of a transaction that met a damaged
// page.
var ErrDamaged = errors.New("database file damaged")

// View runs fn in a read transaction of db (bolt.DB.View).
func View(db *bolt.DB, fn func(*bolt.Tx) error) error {
	return Do(func() error { return db.View(fn) })
}

// Update runs fn in a write transaction of db (bolt.DB.Update); a panic
// rolls the transaction back, as bbolt's Update does.
func Update(db *bolt.DB, fn func(*bolt.Tx) error) error {
	return Do(func() error { return db.Update(fn) })
}

// Do runs fn with faults on the memory map made panics (they would kill
// the process otherwise) and returns any panic as an error wrapping
// ErrDamaged. It is for uses of bbolt outside View and Update (bolt.Open,
// Tx.Check).
func Do(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v", ErrDamaged, r)
		}
	}()
	return fn()
}
