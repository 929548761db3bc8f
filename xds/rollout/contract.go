package rollout

import (
	"github.com/patchbay-io/patchbay/api/contract"
)

// Contract is the part of a model's OIP interface its clients depend on; the type and the
// compatibility rule live in api/contract, shared with the model host's request check.
type Contract = contract.Contract

// Tensor is one input or output as the OIP model metadata describes it.
type Tensor = contract.Tensor

// Metadata is the part of an OIP model metadata answer a contract is checked against.
type Metadata = contract.Metadata

func validateContract(r *Rollout, add func(*Rollout, string, string, ...any)) {
	for _, e := range contract.Validate(r.Contract) {
		f := "contract"
		if e.Field != "" {
			f += "." + e.Field
		}
		add(r, f, "%s", e.Msg)
	}
}

// CheckContract reports every way md breaks c (contract.Check), or nil when it keeps it.
func CheckContract(c *Contract, md Metadata) error { return contract.Check(c, md) }
