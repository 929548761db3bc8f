package main

import (
	"context"
	"errors"
	"io"
)

func runXDS(ctx context.Context, args []string, stderr io.Writer) error {
	return errors.New("xds: not implemented yet")
}

func runRollout(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return errors.New("rollout: not implemented yet")
}
