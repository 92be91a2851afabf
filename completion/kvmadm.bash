# bash completion for kvmadm (installed as
# $(PREFIX)/share/bash-completion/completions/kvmadm by `make install`).
#
# The candidates come from kvmadm itself (`kvmadm _complete CWORD WORDS...`):
# its commands and the admin options from the code's own tables, VM names
# from the tree, VM users from the group and the VMs' owners.  It prints one
# candidate a line, or "@files" when a file name is wanted.
_kvmadm() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local IFS=$'\n'
    local -a cands
    cands=($("${COMP_WORDS[0]}" _complete "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null))
    if [ "${cands[0]-}" = "@files" ]; then
        compopt -o filenames 2>/dev/null
        COMPREPLY=($(compgen -f -- "$cur"))
    else
        COMPREPLY=("${cands[@]}")
    fi
}
complete -F _kvmadm kvmadm
