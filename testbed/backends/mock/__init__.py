"""The mock backend: a fake VM in-process, shipped with testbed (as LISA's selftests use a
mock platform), so the engine, the schedules, the reports and the CLI are tested, and a
newcomer can try every command, with no hypervisor at all. It models a vulnerable
window, phases, the IC's re-offer and builds, from its vm_config."""
