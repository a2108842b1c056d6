from testbed.agent.agent import main

main()
