package boltsafe

import (
	"errors"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestPanicIsDamage: a panic inside a transaction (bbolt's way of saying a
// page is damaged) comes back as an error wrapping ErrDamaged, the
// transaction is rolled back, and the database stays usable.
func TestPanicIsDamage(t *testing.T) {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "x.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = Update(db, func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucket([]byte("b")); err != nil {
			return err
		}
		panic("invalid page type: 7: 0")
	})
	if !errors.Is(err, ErrDamaged) {
		t.Fatalf("Update: %v, want ErrDamaged", err)
	}
	if err := View(db, func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("b")) != nil {
			t.Error("the panicking transaction was committed")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := Update(db, func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("b")); return err }); err != nil {
		t.Fatalf("a write after the panic: %v", err)
	}
	if err := Do(func() error { panic("freelist page 3: unknown type") }); !errors.Is(err, ErrDamaged) {
		t.Fatalf("Do: %v", err)
	}
}
