package admin

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// TokenFileName is the token's name in data_dir when no token_file is set.
const TokenFileName = "admin.token"

// minTokenLen keeps a guessable token out of a configured token_file.
const minTokenLen = 16

// TokenPath is where the admin token lives: tokenFile, or dataDir/admin.token.
func TokenPath(tokenFile, dataDir string) string {
	if tokenFile != "" {
		return tokenFile
	}
	return filepath.Join(dataDir, TokenFileName)
}

// ReadToken reads the admin token without creating one (relay ctl).
func ReadToken(tokenFile, dataDir string) (string, error) {
	path := TokenPath(tokenFile, dataDir)
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	defer f.Close()
	// The admin API listens on loopback, which every local user reaches:
	// a token every user may read is no protection (ssh refuses such keys
	// for the same reason).
	if fi, err := f.Stat(); err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	} else if fi.Mode().Perm()&0o004 != 0 {
		return "", fmt.Errorf("admin token %s is readable by every user (mode %04o): chmod o-r it", path, fi.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if len(tok) < minTokenLen || strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("admin token %s: want one word of at least %d characters", path, minTokenLen)
	}
	return tok, nil
}

// LoadOrCreateToken returns the admin bearer token and the file it is in. A
// configured tokenFile must exist; without one the token is dataDir/admin.token,
// made on first use (32 random bytes, hex, mode 0600) with created = true so
// the caller can log where it is.
func LoadOrCreateToken(tokenFile, dataDir string) (token, path string, created bool, err error) {
	path = TokenPath(tokenFile, dataDir)
	if tokenFile != "" {
		token, err = ReadToken(tokenFile, dataDir)
		return token, path, false, err
	}
	if dataDir == "" {
		return "", path, false, errors.New("admin token: neither token_file nor data_dir is set")
	}
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		return "", path, false, fmt.Errorf("admin token: %w", err)
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", path, false, err
	}
	token = hex.EncodeToString(raw[:])
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		token, err = ReadToken("", dataDir)
		return token, path, false, err
	}
	if err != nil {
		return "", path, false, fmt.Errorf("admin token: %w", err)
	}
	_, err = f.WriteString(token + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", path, false, fmt.Errorf("admin token: %w", err)
	}
	return token, path, true, nil
}
