package main

import (
	"context"
	"errors"
	"io"
)

// runModelhost is replaced by the modelhost implementation.
func runModelhost(ctx context.Context, args []string, stderr io.Writer) error {
	return errors.New("modelhost: not implemented yet")
}
