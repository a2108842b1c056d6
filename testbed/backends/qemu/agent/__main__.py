from testbed.backends.qemu.agent.program import main

main()
