package main

import (
	"context"
	"errors"
	"io"
)

// runExtproc is replaced by the extproc implementation.
func runExtproc(ctx context.Context, args []string, stderr io.Writer) error {
	return errors.New("extproc: not implemented yet")
}
