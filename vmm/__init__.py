"""sm's virtual machine monitor: boots Linux microVMs on KVM from Python."""
